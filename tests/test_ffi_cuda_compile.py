"""CI has no GPU, so the CUDA kernels of the FFI layers are at least compiled here (sm_90, Hopper):
the plain layer (csrc/ffi_cuda.cu) and the group-shared one (csrc/ffi_group_cuda.cu), each under the
plain and the torch build flags; every kernel family instantiated, no register spills, and the group
layer's bf16 kernels on tensor cores (wmma MMA instructions in their PTX).

A missing nvcc fails the test (it does not skip): CI machines are expected to carry the CUDA toolkit.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
# Kernel families each source must instantiate; the group layer's templated ones for both dtypes.
KERNELS = {
    "ffi_cuda.cu": (
        "gather_kernel",
        "dw_kernel",
        "dx_atomic_kernel",
        "fused_backward_kernel",
        "from_tiles_kernel",
    ),
    "ffi_group_cuda.cu": (
        "group_fwd_simt_kernelIf",
        "group_fwd_simt_kernelI13__nv_bfloat16",
        "group_bwd_simt_kernelIf",
        "group_bwd_simt_kernelI13__nv_bfloat16",
        "group_fwd_mma_kernel",
        "group_bwd_mma_kernel",
        "group_to_tiles_kernelIf",
        "group_to_tiles_kernelI13__nv_bfloat16",
        "group_from_tiles_kernelIf",
        "group_from_tiles_kernelI13__nv_bfloat16",
        "group_float_to_kernelI13__nv_bfloat16",
    ),
}
# Kernels whose products must run on tensor cores.
MMA_KERNELS = {"ffi_group_cuda.cu": ("group_fwd_mma_kernel", "group_bwd_mma_kernel")}
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


@pytest.mark.parametrize("source", sorted(KERNELS))
@pytest.mark.parametrize("extra", [[], TORCH_FLAGS], ids=["plain", "torch-flags"])
def test_ffi_cuda_compiles_for_sm90(tmp_path: Path, extra: list[str], source: str) -> None:
    nvcc = find_nvcc()
    obj = tmp_path / "kernels.o"
    # -Xptxas -v: ptxas names the target of every kernel it assembles, proving sm_90 machine code is in.
    # --keep: the PTX stays in tmp_path (no extra compile) for the tensor-core check.
    cmd = [nvcc, *BASE_FLAGS, *extra, "-Xptxas", "-v", "--keep", f"--keep-dir={tmp_path}", f"-I{CSRC}"]
    cmd += [str(CSRC / source), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr}\n{proc.stdout}"
    assert obj.stat().st_size > 0
    report = proc.stderr + proc.stdout
    assert "for 'sm_90'" in report, report
    # Every kernel family is instantiated (a launcher that nothing calls would compile to nothing).
    compiled = [line for line in report.splitlines() if "Compiling entry function" in line]
    for kernel in KERNELS[source]:
        assert any(kernel in line for line in compiled), f"{kernel} was not compiled:\n{report}"
    # Register spills to local memory would slow the gathers badly: none allowed.
    spills = [line for line in report.splitlines() if "spill" in line and " 0 bytes spill stores" not in line]
    assert not spills, "\n".join(spills)
    if source in MMA_KERNELS:
        ptx = (tmp_path / source.replace(".cu", ".ptx")).read_text()
        entries = {m.group(1): m.end() for m in re.finditer(r"\.entry\s+(\w+)\(", ptx)}
        bounds = sorted(entries.values()) + [len(ptx)]
        for kernel in MMA_KERNELS[source]:
            names = [name for name in entries if kernel in name]
            assert names, f"{kernel} not in the PTX"
            start = entries[names[0]]
            body = ptx[start : bounds[bounds.index(start) + 1]]
            has_mma = "wmma.mma.sync" in body and ".bf16" in body
            assert has_mma, f"{kernel}: no bf16 tensor-core MMA in its PTX"
