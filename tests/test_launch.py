"""Both launch modes start real ranks that agree with each other and fail as one job.

`deepspeed` (local CPU ranks, Horovod over a Gloo rendezvous) and `mpirun` (Horovod over MPI) each
start 2 ranks that run the start-up self-check: a torch.distributed allreduce over the world and the
grid groups and Horovod fp16-compressed allreduces, all with exact expected results.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launchers import ROOT, run_launched

TRAIN = ROOT / "launch" / "train.py"


def run_train(launcher: str, nranks: int, out: Path, *sets: str, env: dict | None = None):
    args = ["--config", str(ROOT / "configs" / "demo.json"), "--check", "--set", f"train.output_dir={out}"]
    args += [a for s in sets for a in ("--set", s)]
    return run_launched(launcher, nranks, TRAIN, args, cwd=out.parent, env=env)


@pytest.mark.parametrize("launcher, controller", [("deepspeed", "gloo"), ("mpirun", "mpi")])
@pytest.mark.parametrize("mp", [1, 2])
def test_two_ranks_agree_and_allreduce_exactly(tmp_path, launcher, controller, mp):
    out = tmp_path / "run"
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    proc, _ = run_train(launcher, 2, out, f"parallel.model_parallel={mp}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU shared-memory allreduce segments are unlinked, not left in /dev/shm
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) <= shm_before
    assert f"self-check ok: 2 ranks ({2 // mp} dp x {mp} mp)" in proc.stdout
    reports = [json.loads((out / "selfcheck" / f"rank{r}.json").read_text()) for r in range(2)]
    for r, rep in enumerate(reports):
        assert (rep["rank"], rep["world_size"]) == (r, 2)
        assert (rep["horovod_rank"], rep["horovod_size"]) == (r, 2)
        assert rep["horovod_controller"] == controller
        assert rep["launcher"] == ("mpi" if launcher == "mpirun" else "deepspeed")
        assert rep["torch_allreduce"] == [3.0, 2.0]
        assert rep["horovod_allreduce_fp16"] == [1.0, -1.0, 1024.0]
        assert rep["horovod_dp_allreduce"] == [float(2 // mp)]
        assert (rep["mp_rank"], rep["dp_rank"]) == ((r % mp), (r // mp))
    saved = json.loads((out / "config.json").read_text())
    assert saved["parallel"]["model_parallel"] == mp and saved["train"]["output_dir"] == str(out)


@pytest.mark.parametrize("launcher", ["deepspeed", "mpirun"])
@pytest.mark.parametrize("kind", ["raise", "kill"])
def test_failing_rank_ends_the_job(tmp_path, launcher, kind):
    env = {"XMC_FAULT_RANK": "1", "XMC_FAULT_KIND": kind}
    proc, elapsed = run_train(launcher, 2, tmp_path / "run", env=env)
    assert proc.returncode != 0
    assert elapsed < 60, f"job took {elapsed:.0f}s to end after a rank failed"
    output = proc.stdout + proc.stderr
    if kind == "raise":
        assert "[rank 1] failed: RuntimeError: injected fault" in output, output[-3000:]
    elif launcher == "mpirun":
        assert "process rank 1" in output and "signal 9" in output, output[-3000:]
    else:
        assert "--local_rank=1" in output and "exits with return code" in output, output[-3000:]
    assert not (tmp_path / "run" / "selfcheck" / "rank0.json").exists()
