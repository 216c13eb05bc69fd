"""Start a script under a real launcher (`deepspeed` or `mpirun`) with N local CPU ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.multiproc import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",  # CI runs as root
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",  # more ranks than cores
    "OMP_NUM_THREADS": "1",
}


def launch_command(launcher: str, nranks: int) -> list[str]:
    if launcher == "deepspeed":
        return ["deepspeed", "--num_gpus", str(nranks), "--master_port", str(free_port())]
    if launcher == "mpirun":
        return ["mpirun", "-np", str(nranks), "--bind-to", "none", sys.executable]
    raise ValueError(launcher)


def run_launched(
    launcher: str,
    nranks: int,
    script: Path,
    args: list[str],
    cwd: Path,
    env: dict | None = None,
    timeout: float = 300,
) -> tuple[subprocess.CompletedProcess, float]:
    """Run `script args` on `nranks` ranks; returns the finished process and its wall time."""
    cmd = [*launch_command(launcher, nranks), str(script), *args]
    start = time.monotonic()
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **LAUNCH_ENV, **(env or {})},
    )
    return proc, time.monotonic() - start
