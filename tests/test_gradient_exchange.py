"""Horovod gradient exchange of the output layer, under both real launchers.

The worker (tests/workers/exchange_worker.py) checks every mode against an exact reference on every
rank: `none` equals the exact average, fp16/bf16 within their precision, topk's sent + residual equals
the accumulated gradient exactly, local SGD averages parameters every `sync_every` steps.
"""

from __future__ import annotations

import json

import pytest

from tests.launchers import ROOT, run_launched

WORKER = ROOT / "tests" / "workers" / "exchange_worker.py"


@pytest.mark.parametrize(
    "launcher, nranks, mp",
    [("deepspeed", 2, 1), ("mpirun", 2, 1), ("mpirun", 4, 2)],
    ids=["ds-2", "mpi-2", "mpi-2x2"],
)
def test_exchange_modes_match_reference(tmp_path, launcher, nranks, mp):
    out = tmp_path / "out"
    proc, _ = run_launched(launcher, nranks, WORKER, [str(out), str(mp)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nranks)]
    for r, rep in enumerate(reports):
        assert rep["replicas"] == list(range(r % mp, nranks, mp))
        sent = rep["bytes"]
        assert sent["none"] == (300 * 16 + 300) * 4
        assert sent["fp16"] == sent["bf16"] == sent["none"] // 2
        assert sent["none"] / sent["topk"] >= 25  # 1% of the entries as (int32, float32) pairs
