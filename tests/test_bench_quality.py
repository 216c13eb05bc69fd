"""`bench.py quality` end to end on a tiny real set: the peers and our heads side by side.

The set is the tiny real one of `tests/tiny_debian.py` (this machine's APT index, its smaller
Packages files): ~2,500 training rows, ~2,000 labels, 2,000 features.
The assertions check the plumbing (every system in the table, the JSON and the chart, the same
metric code for all) and that every system learns (beats the popularity baseline), not timings.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launchers import ROOT
from tests.tiny_debian import build_tiny_debian

SYSTEMS = ["omikuji", "pecos", "napkinxc", "dense", "ffi", "rp"]
TINY = [
    "data.batch_size=128",
    "model.hidden_dims=[128]",
    "model.embed_dim=64",
    "model.ffi.hidden=256",
    "model.ffi.fan_in=16",
    "model.rp.dim=16",
    "model.rp.recovery_lambda=0.001",
    "train.epochs=8",
    "train.warmup_steps=5",
    "train.lr=0.005",
    "train.eval_every=20",
    "train.log_every=10",
]


@pytest.fixture(scope="module")
def tiny_debian(tmp_path_factory) -> Path:
    return build_tiny_debian(tmp_path_factory.mktemp("tiny_debian"))


@pytest.fixture(scope="module")
def quality(tmp_path_factory, tiny_debian) -> tuple[subprocess.CompletedProcess, Path]:
    """One `bench.py quality` run over every system (shared: each run costs minutes on 2 cores)."""
    out = tmp_path_factory.mktemp("bench") / "quality"
    cmd = [sys.executable, str(ROOT / "launch" / "bench.py"), "quality", "--data", str(tiny_debian)]
    cmd += ["--out", str(out), "--systems", ",".join(SYSTEMS), "--ranks", "2"]
    for s in TINY:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, out


def test_quality_table_has_every_system_and_each_learns(quality):
    proc, out = quality
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["suite"] == "quality"
    rows = result["systems"]
    # the recipe adds neighbour votes (model.neighbours): each head also scored alone
    alone = {f"{head} head alone" for head in ("dense", "ffi", "rp")}
    expected = {"popularity", *SYSTEMS, "rp+recovered", *alone}
    assert set(rows) == expected
    table = proc.stdout[proc.stdout.index("system") :]
    for name in expected:
        assert f" {name} " in table
    assert (out / "quality.png").stat().st_size > 1000
    assert json.loads((out / "quality.json").read_text())["systems"].keys() == rows.keys()
    assert result["propensity"] == {"A": 0.55, "B": 1.5}
    popular = rows["popularity"]
    for name in expected - {"popularity"}:
        r = rows[name]
        assert r["P@1"] > popular["P@1"] and r["P@5"] > popular["P@5"], (name, r, popular)
        assert r["train_s"] > 0 and r["predict_s"] > 0 and r["samples_per_s"] > 0, (name, r)
        assert all(0 <= r[k] <= 1 for k in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")), (name, r)


def test_our_head_scores_equal_the_trainers_own_evaluation(quality, tiny_debian):
    """The bench scores our heads from predict.py's top-k with the same code that scores the peers;
    on the same test set that must equal the trainer's own distributed evaluation."""
    proc, out = quality
    bench = json.loads(proc.stdout.strip().splitlines()[-1])["systems"]["dense"]
    trainer = json.loads((out / "runs" / "dense" / "final_metrics.json").read_text())["final"]
    for key in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5"):
        assert bench[key] == pytest.approx(trainer[key], abs=1e-9), key
    top = np.load(out / "runs" / "dense" / "test_top5.npy")
    assert top.shape == (int(Path(tiny_debian / "test.txt").read_text().split()[0]), 5)
