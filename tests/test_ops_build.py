"""The extension's build cache (`pipeline.ops.build`): a build killed mid-way is not waited for.

torch's JIT build marks a folder being built with a `lock` file; a builder killed before it removes
it (a scheduler's SIGKILL, a lost host) leaves it there, and torch alone would have every later process
wait for it forever. A copy of this checkout's built folder with such a file left in it must load at
once in a new process, the file gone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from pipeline.ops.build import build_folder, load_ops
from tests.launchers import ROOT

LOAD = (
    "from pipeline.ops.build import load_ops; load_ops(); import torch; print(torch.ops.xmc.lazy_adam_rows)"
)


def test_a_stale_build_lock_is_not_waited_for(tmp_path):
    load_ops()
    built = build_folder()
    assert built is not None and (built / f"{built.name}.so").is_file()
    cache = tmp_path / "cache"
    shutil.copytree(built, cache / built.name)  # timestamps kept: up to date for ninja
    (cache / built.name / "lock").touch()  # a builder died holding torch's lock
    env = {**os.environ, "XMC_EXTENSIONS_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lazy_adam_rows" in proc.stdout
    assert not (cache / built.name / "lock").exists()
