#!/usr/bin/env bash
# The whole pipeline on a GPU machine, end to end: `bash launch/gpu/train.sh fetch` here (with the
# package registries), then `bash launch/gpu/train.sh run` there (no network), carrying .gpu_wheels.
#
# The GPU machines have torch with CUDA and nvcc but neither DeepSpeed, Horovod nor our other
# dependencies (they have only torch with CUDA). `fetch` fills .gpu_wheels (git-ignored) with the wheels of
# DeepSpeed (built here: its PyPI release is an sdist) and of our dependencies for the machine's
# Python (3.12, manylinux x86_64), and the Horovod sdist. grpcio is left out (TensorBoard's writer
# does not need it) to stay inside the 64 MiB a device call can carry.
# `run` installs them, builds Horovod there (PyTorch + Gloo, C++17 as setup.sh does), then trains on
# one GPU with the deepspeed launcher: the demo (FFI head, 400 steps) and a 670K-label FFI run
# (Amazon-670K-shaped synthetic data); each prints its test metrics and the peak GPU memory. Data and
# runs live under $WORK (default /tmp/xmc_gpu); the log, each run's final_metrics.json and
# metrics.jsonl, and the Horovod wheel (to carry to a next call) go to $OUT (default ./gpu_out).
set -uo pipefail
cd "$(dirname "$0")/../.."
WHEELS=$PWD/.gpu_wheels
PY=${PYTHON:-python3}
HOROVOD=0.28.1

fetch() {
  mkdir -p "$WHEELS"
  DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation "deepspeed==0.19.8" -w "$WHEELS"
  pip download -q --no-deps --no-binary :all: -d "$WHEELS" "horovod==$HOROVOD"
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$WHEELS" numpy "pydantic>=2,<3" pydantic_core annotated_types typing_extensions typing_inspection \
    hjson msgpack psutil py-cpuinfo einops tqdm nvidia-ml-py braceexpand pyyaml "webdataset==1.0.2" \
    cffi pycparser cloudpickle tensorboard tensorboard-data-server protobuf absl-py markdown markupsafe \
    werkzeug matplotlib contourpy cycler fonttools kiwisolver pillow pyparsing python-dateutil six \
    setuptools
  du -sh "$WHEELS"
}

run() {
  OUT=${OUT:-$PWD/gpu_out}
  local work=${WORK:-/tmp/xmc_gpu}
  mkdir -p "$OUT" "$work"
  exec > >(tee -a "$OUT/gpu_train_log.txt") 2>&1
  local t0=$SECONDS
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's package, not installed there
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl "$OUT"/horovod-*.whl 2>/dev/null ||
    "$PY" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl || return 1
  if ! "$PY" -c "import horovod.torch" 2>/dev/null; then
    local build
    build=$(mktemp -d)
    tar -xzf "$WHEELS/horovod-$HOROVOD.tar.gz" -C "$build"
    grep -rl --include=CMakeLists.txt 'CMAKE_CXX_STANDARD 14' "$build/horovod-$HOROVOD" |
      xargs sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/'
    # gcc >= 13 no longer pulls <string>/<cstdint> in through other headers; horovod 0.28.1 relied on it
    (cd "$build/horovod-$HOROVOD" && CXXFLAGS="-include cstdint -include string -include stdexcept" HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
      HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 \
      MAKEFLAGS="-j$(nproc)" timeout 300 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .) ||
      return 1
    "$PY" -m pip install -q --no-index --no-deps "$OUT"/horovod-*.whl || return 1
  fi
  echo "=== installed in $((SECONDS - t0)) s: $("$PY" -c 'import torch, deepspeed, horovod
print(torch.__version__, deepspeed.__version__, horovod.__version__)')"
  local status=0
  deepspeed --num_gpus 1 launch/train.py --config configs/demo.json --set parallel.model_parallel=1 \
    --set data.train="$work/data/demo/train" --set data.test="$work/data/demo/test" \
    --set train.output_dir="$work/runs/demo" || status=1
  echo "=== demo done at $((SECONDS - t0)) s"
  deepspeed --num_gpus 1 launch/train.py --config configs/amazon670k_ffi.json \
    --set parallel.model_parallel=1 --set data.synthetic.num_train=100000 --set data.synthetic.num_test=20000 \
    --set data.train="$work/data/a670k/train" --set data.test="$work/data/a670k/test" \
    --set data.batch_size=128 --set train.steps=300 --set train.warmup_steps=20 --set train.log_every=50 \
    --set train.eval_every=0 --set train.checkpoint_every=0 \
    --set train.output_dir="$work/runs/a670k_ffi" || status=1
  for run in demo a670k_ffi; do
    mkdir -p "$OUT/$run"
    cp "$work/runs/$run/final_metrics.json" "$work/runs/$run/metrics.jsonl" "$OUT/$run/" 2>/dev/null
  done
  echo "=== done in $((SECONDS - t0)) s, status $status"
  return $status
}

case "${1:-}" in
  fetch) fetch ;;
  run) run ;;
  *) echo "usage: bash launch/gpu/train.sh fetch|run" >&2; exit 2 ;;
esac
