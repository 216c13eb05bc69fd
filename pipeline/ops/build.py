"""Builds and loads the C++/CUDA extension behind `torch.ops.xmc.*`, once per process.

Compiled with torch.utils.cpp_extension (ninja) on first use and cached in a folder keyed by a hash of
the sources, their folder, flags, torch version and CUDA arch, so edits rebuild and a cache copied to
another machine is never reused for the wrong build. Processes that start together build once: the
others wait on a lock that dies with its holder, so a build killed mid-way is redone, never waited for.
No -march=native: the innermost CPU loops carry their own AVX-512 / AVX2 / baseline clones. With a
visible GPU and `csrc/ffi_cuda.cu` present, the CUDA kernels are compiled in too (`-DXMC_WITH_CUDA`);
the group-shared CUDA kernels (`ffi_group_cuda.cu` with its header) join them where both files exist
(`-DXMC_WITH_GROUP_CUDA`), so a checkout without them still builds (its group ops then run on CPU
tensors only).

Environment variables of the extension, all optional (this is the one list of them):

    XMC_EXTENSIONS_DIR     build cache (default ~/.cache/xmc-pipeline/torch_extensions)
    XMC_BUILD_VERBOSE=1    show the compiler's output
    XMC_FFI_CUDA=0         build without the CUDA kernels even where a GPU is visible
    XMC_FFI_DX             CUDA FFI backward for dx: atomic (default; float4 reductions into an
                           L2-resident float32 accumulator) or csc (counting sort by input, no atomics)
    XMC_FFI_FUSED          CUDA FFI backward: auto (default; dx and dW in one pass for float32 only),
                           1 (fused for float32 and bfloat16), 0 (never fused)
    XMC_FFI_L2_BUDGET_MB   CUDA: bytes of one batch tile kept L2-resident (default 45% of the card's L2)
    XMC_FFI_GROUP_PLAIN    CUDA group-shared ops at G = 1: 1 (default) the plain layer's kernels, 0 the
                           group kernels (for the GPU check)
    XMC_FFI_GROUP_MMA      CUDA group-shared bf16 forward: 1 (default) tensor cores (wmma) where G is a
                           multiple of 16, 0 the SIMT path always

The XMC_FFI_* kernel knobs are read on every call, so a process can switch between calls (the
benchmarks and the GPU check compare the variants); the defaults are the measured best.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import warnings
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = (
    "ffi_binding.cpp",
    "ffi_cpu.cpp",
    "ffi_group_cpu.cpp",
    "linear_softmax.cpp",
    "linear_hinge.cpp",
    "lazy_adam.cpp",
)
CUDA_SOURCES = ("ffi_cuda.cu", "ffi_group_cuda.cu")  # the first is required for a CUDA build
GROUP_CUDA = ("ffi_group_cuda.cu", "ffi_group_cuda.h")  # compiled in only where both exist
HEADERS = (
    "cpu_common.h",
    "ffi_cpu.h",
    "ffi_group_cpu.h",
    "cuda_scratch.cuh",
    "ffi_cuda.h",
    "ffi_group_cuda.h",
)
CFLAGS = ["-O3", "-fopenmp", "-std=c++17"]
LDFLAGS = ["-fopenmp"]

_loaded: Path | None = None  # the build folder of the extension this process loaded


def cache_root() -> Path:
    """Where built extensions are kept between processes."""
    default = Path.home() / ".cache" / "xmc-pipeline" / "torch_extensions"
    return Path(os.environ.get("XMC_EXTENSIONS_DIR", default))


def _want_cuda() -> bool:
    if os.environ.get("XMC_FFI_CUDA", "1") == "0" or not torch.cuda.is_available():
        return False
    if not (CSRC / CUDA_SOURCES[0]).exists():
        warnings.warn(
            f"a GPU is visible but {CSRC / CUDA_SOURCES[0]} is missing: building the FFI ops for CPU only, "
            "so they will refuse CUDA tensors",
            stacklevel=3,
        )
        return False
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        raise RuntimeError(
            "a GPU is visible but no CUDA toolkit was found (set CUDA_HOME to a folder with bin/nvcc), "
            "or set XMC_FFI_CUDA=0 for a CPU-only build of the FFI ops"
        )
    return True


def _cuda_sources() -> tuple[list[Path], list[str]]:
    """The CUDA sources to compile and the defines they bring: the group kernels only with both files."""
    with_group = all((CSRC / name).exists() for name in GROUP_CUDA)
    names = [s for s in CUDA_SOURCES if with_group or s not in GROUP_CUDA]
    return [CSRC / s for s in names], ["-DXMC_WITH_CUDA"] + (["-DXMC_WITH_GROUP_CUDA"] if with_group else [])


def _cuda_flags() -> list[str]:
    major, minor = torch.cuda.get_device_capability()
    return [
        "-O3",
        "--use_fast_math",
        "-std=c++17",
        f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}",
    ]


def _check_toolchain() -> None:
    from torch.utils.cpp_extension import is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(
            f"C++ compiler '{compiler}' not found: the FFI ops are compiled on first use "
            "(install g++, e.g. `apt-get install g++`, or point CXX at a compiler)"
        )
    if not is_ninja_available():
        raise RuntimeError("ninja not found: torch.utils.cpp_extension needs it (`pip install ninja`)")


def load_ops() -> None:
    """Compile (if not cached) and load the extension; afterwards `torch.ops.xmc.ffi_*` exist."""
    global _loaded
    if _loaded is not None:
        return
    _check_toolchain()
    from torch.utils.cpp_extension import load

    with_cuda = _want_cuda()
    cuda_sources, defines = _cuda_sources() if with_cuda else ([], [])
    sources = [CSRC / s for s in CPU_SOURCES] + cuda_sources
    cuda_flags = _cuda_flags() if with_cuda else []
    cflags = CFLAGS + defines
    digest = hashlib.sha256()
    for path in sources + [CSRC / h for h in HEADERS if (CSRC / h).exists()]:
        digest.update(path.name.encode() + path.read_bytes())
    # the checkout's path too: ninja's build file names the sources by path, so two checkouts sharing
    # a folder would rebuild it in turn
    digest.update(repr((str(CSRC), cflags, cuda_flags, LDFLAGS, torch.__version__)).encode())
    name = f"xmc_ffi_{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()[:16]}"
    build_dir = cache_root() / name
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "build.flock", "w") as guard:
        # One builder at a time, under a lock the kernel releases when its holder dies. torch's own
        # lock is a file that a builder killed mid-way (a scheduler's kill, Ctrl-C, a lost host)
        # leaves behind, and every later process would wait for it forever; under ours it is stale.
        fcntl.flock(guard, fcntl.LOCK_EX)
        (build_dir / "lock").unlink(missing_ok=True)
        load(
            name=name,
            sources=[str(s) for s in sources],
            extra_cflags=cflags,
            extra_cuda_cflags=cuda_flags + defines,
            extra_ldflags=LDFLAGS,
            extra_include_paths=[str(CSRC)],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=os.environ.get("XMC_BUILD_VERBOSE", "0") == "1",
        )
    _loaded = build_dir


def build_folder() -> Path | None:
    """The cache folder the loaded extension was built in (None before `load_ops`)."""
    return _loaded
