"""CI has no GPU, so the CUDA kernels of the FFI layer are at least compiled here (sm_90, Hopper).

A missing nvcc fails the test (it does not skip): CI machines are expected to carry the CUDA toolkit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCE = CSRC / "ffi_cuda.cu"
BASE_FLAGS = ["-arch=sm_90", "-std=c++17", "-O3", "-c"]
# The defines torch.utils.cpp_extension passes to nvcc, plus the build's own flags (pipeline/ops/build.py):
# the kernels must build under those too (no implicit bf16 conversions, fast math).
TORCH_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
    "--use_fast_math",
    "-DXMC_WITH_CUDA",
]


def find_nvcc() -> str:
    """nvcc from CUDA_HOME / CUDA_PATH, then PATH, then the usual install folders."""
    candidates = [
        Path(os.environ[v]) / "bin" / "nvcc" for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)
    ]
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates += [Path("/usr/local/bin/nvcc"), Path("/usr/local/cuda/bin/nvcc")]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    pytest.fail(
        "nvcc not found (looked in $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, /usr/local/bin, "
        "/usr/local/cuda/bin): the CUDA kernels of the FFI layer cannot be compile-checked; "
        "install the CUDA toolkit or set CUDA_HOME"
    )


@pytest.mark.parametrize("extra", [[], TORCH_FLAGS], ids=["plain", "torch-flags"])
def test_ffi_cuda_compiles_for_sm90(tmp_path: Path, extra: list[str]) -> None:
    nvcc = find_nvcc()
    obj = tmp_path / "ffi_cuda.o"
    # -Xptxas -v: ptxas names the target of every kernel it assembles, proving sm_90 machine code is in.
    cmd = [nvcc, *BASE_FLAGS, *extra, "-Xptxas", "-v", f"-I{CSRC}", str(SOURCE), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr}\n{proc.stdout}"
    assert obj.stat().st_size > 0
    report = proc.stderr + proc.stdout
    assert "for 'sm_90'" in report, report
    # Every kernel family is instantiated (a launcher that nothing calls would compile to nothing).
    for kernel in (
        "gather_kernel",
        "dw_kernel",
        "dx_atomic_kernel",
        "fused_backward_kernel",
        "from_tiles_kernel",
    ):
        assert kernel in report, f"{kernel} was not compiled:\n{report}"
    # Register spills to local memory would slow the gathers badly: none allowed.
    spills = [line for line in report.splitlines() if "spill" in line and " 0 bytes spill stores" not in line]
    assert not spills, "\n".join(spills)
