#!/usr/bin/env bash
# The one device run of the FFI CUDA kernels: `bash launch/gpu/run.sh` from anywhere.
#
# Prints the card and toolchain, builds the extension (timed), runs launch/gpu/check_cuda.py (correctness,
# the 670K training step, kernel timings at scale for both dx modes; then, as its own stage, the
# group-shared layer: correctness and timings at G = 1, 8, 16, 32), compute-sanitizer memchecks of small
# cases (plain layer, group layer), and the `bench.py ffi` suite once per dx mode. Everything is tee'd to
# $OUT/gpu_log.txt ($OUT defaults to ./gpu_out). Each stage has a time cap; the caps add up to more
# than the device's 10-minute per-command limit, so a short session picks stages by their first word:
#   STAGES="build check_group memcheck_group" bash launch/gpu/run.sh
# (unset: every stage; names: build check_cuda check_group l2_bandwidth memcheck memcheck_group bench).
# The exit status is 1 if any stage that ran failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_log.txt"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

export PYTHONUNBUFFERED=1
export MAX_JOBS=${MAX_JOBS:-16}  # ninja jobs of the extension build
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, not installed there
PY=${PYTHON:-python3}            # the GPU image's python3 holds torch; `python` may not exist
status=0
t_start=$SECONDS

# stage NAME CAP_SECONDS CMD...: run with a time cap, log rc and duration, remember failures; skipped
# when STAGES is set and does not name the stage's first word.
stage() {
  local name=$1 cap=$2
  shift 2
  if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" ${name%% *} "* ]]; then
    echo "=== [$name] skipped (STAGES=$STAGES)"
    return 0
  fi
  echo "=== [$name] (cap ${cap}s): $*"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=10 "$cap" "$@"
  local rc=$?
  echo "=== [$name] rc=$rc after $((SECONDS - t0)) s (total $((SECONDS - t_start)) s)"
  if [ "$rc" -ne 0 ]; then status=1; fi
  return 0
}

echo "=== card and toolchain"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.memory,power.limit \
  --format=csv || status=1
nvcc --version | tail -n 2 || echo "nvcc not on PATH"
"$PY" - <<'EOF'
import torch

p = torch.cuda.get_device_properties(0)
clock = getattr(p, "memory_clock_rate", 0) or 0  # kHz, if this torch exposes it
bus = getattr(p, "memory_bus_width", 0) or 0  # bits
# Published peaks (datasheets): H100 SXM 3.35 TB/s, H100 NVL 3.9, H100 PCIe 2.0, H200 4.8.
published = {"H200": 4.8, "H100 NVL": 3.9, "H100 PCIe": 2.0, "H100": 3.35}
name_peak = next((v for k, v in published.items() if k in p.name), None)
derived = 2 * clock * 1e3 * bus / 8 / 1e12 if clock and bus else None
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}); {p.name}: cc {p.major}.{p.minor}, "
      f"{p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
      f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
print(f"peak memory bandwidth: from clock x bus {derived} TB/s; published for this name {name_peak} TB/s")
EOF

# Build (cached by source hash under ~/.cache/xmc-pipeline) and prove the CUDA dispatch is in.
stage build 180 "$PY" - <<'EOF'
import time

import torch

t0 = time.perf_counter()
from pipeline.ops import load_ops

load_ops()
print(f"extension built and loaded in {time.perf_counter() - t0:.1f} s")
x = torch.randn(4, 16, device="cuda")
w = torch.randn(8, 3, device="cuda")
i = torch.randint(0, 16, (8, 3), device="cuda", dtype=torch.int32)
y = torch.ops.xmc.ffi_forward(x, w, i, None)
torch.cuda.synchronize()
print("CUDA dispatch works:", tuple(y.shape), y.device)
# The group-shared op too: 8 labels in groups of 4 share 2 index rows.
y = torch.ops.xmc.ffi_group_forward(x, w, i[:2].contiguous(), None, 4)
torch.cuda.synchronize()
print("CUDA dispatch of the group op works:", tuple(y.shape), y.device)
EOF

stage check_cuda 180 "$PY" launch/gpu/check_cuda.py --skip-group
stage check_group 150 "$PY" launch/gpu/check_cuda.py --group-only

# The L2 and HBM streaming bandwidth of this card: the bound of the FFI kernels' gathers and atomics.
ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
stage l2_bandwidth 60 bash -c "nvcc -O3 -arch=sm_${ARCH} launch/gpu/l2_bandwidth.cu -o /tmp/l2_bandwidth && /tmp/l2_bandwidth"

# Out-of-bounds / misaligned accesses in every kernel, both dx modes, odd shape with several tiles.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer \
  /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
if [ -n "$SANITIZER" ]; then
  stage memcheck 90 "$SANITIZER" --tool memcheck --error-exitcode 3 "$PY" - <<'EOF'
import os

import torch

from pipeline.ops import draw_fan_in_indices, load_ops

load_ops()
os.environ["XMC_FFI_L2_BUDGET_MB"] = "0.05"  # many batch tiles on a small problem
os.environ["XMC_FFI_FUSED"] = "1"  # ffi_backward: the fused kernel for both dtypes
for dtype in (torch.float32, torch.bfloat16):
    for mode in ("atomic", "csc"):
        os.environ["XMC_FFI_DX"] = mode
        n, h, c, k = 131, 517, 1203, 33
        x = torch.randn(n, h, device="cuda").to(dtype)
        w = torch.randn(c, k, device="cuda").to(dtype)
        b = torch.randn(c, device="cuda").to(dtype)
        dy = torch.randn(n, c, device="cuda").to(dtype)
        i = draw_fan_in_indices(c, h, k).to(device="cuda", dtype=torch.int32)
        torch.ops.xmc.ffi_forward(x, w, i, b)
        torch.ops.xmc.ffi_backward_input(dy, w, i, h)
        torch.ops.xmc.ffi_backward_weight(dy, x, i)
        torch.ops.xmc.ffi_backward(dy, x, w, i, True, True)  # fused in atomic mode
        torch.cuda.synchronize()
        print("memcheck pass:", dtype, mode)
EOF
  # The group layer: every kernel (SIMT both dtypes, bf16 tensor cores, G = 1 through the group
  # kernels), partial last groups, groups wider than a block, several batch tiles and K-chunks, one
  # gradient or both.
  stage memcheck_group 90 "$SANITIZER" --tool memcheck --error-exitcode 3 "$PY" - <<'EOF'
import os

import torch

from pipeline.ops import draw_fan_in_indices, load_ops

load_ops()
n, h, c, k = 131, 517, 203, 33
variants = [(1, {"XMC_FFI_GROUP_PLAIN": "0"}), (8, {}), (12, {}), (16, {}), (16, {"XMC_FFI_GROUP_MMA": "0"}), (80, {})]
for dtype in (torch.float32, torch.bfloat16):
    for g, env in variants:
        os.environ.pop("XMC_FFI_GROUP_PLAIN", None)
        os.environ.pop("XMC_FFI_GROUP_MMA", None)
        os.environ.update(env)
        q = -(-c // g)
        x = torch.randn(n, h, device="cuda").to(dtype)
        w = torch.randn(c, k, device="cuda").to(dtype)
        b = torch.randn(c, device="cuda").to(dtype)
        dy = torch.randn(n, c, device="cuda").to(dtype)
        i = draw_fan_in_indices(q, h, k).to(device="cuda", dtype=torch.int32)
        torch.ops.xmc.ffi_group_forward(x, w, i, b, g)
        for flags in ((True, True), (True, False), (False, True)):
            torch.ops.xmc.ffi_group_backward(dy, x, w, i, g, *flags)
        torch.cuda.synchronize()
        print("memcheck pass (group):", dtype, "G =", g, env)
EOF
else
  echo "compute-sanitizer not found: memcheck left out"
fi

# bench.py ffi: FFI vs nn.Linear vs torch CSR at its comparison shape (256 x 2048 -> 65,536, K 32)
# and the FFI layer alone at 670K labels (H 65,536, K 32) with the dense nn.Linear(768, 670091) and
# CSR there. (Its --hidden/--labels flags size the *compare* stage, which builds a dense copy of the
# layer: 65,536 x 670,091 would need 175 GB, so the 670K figures come from its scale stage and from
# check_cuda.py's timings, which also cover K 64 and batch 512.)
for mode in atomic csc; do
  stage "bench ffi dx=$mode" 70 env XMC_FFI_DX=$mode "$PY" launch/bench.py ffi --device cuda --scale-batch 128 \
    --repeats 3
done

echo "=== done in $((SECONDS - t_start)) s, status $status (log: $LOG)"
exit "$status"
