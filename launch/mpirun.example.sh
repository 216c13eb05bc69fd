#!/usr/bin/env bash
# mpirun on HPC nodes: Horovod uses MPI, torch.distributed rendezvous is set up over MPI by train.py.
# 8 ranks on two nodes of 4 slots each; as root add --allow-run-as-root; on fewer cores than ranks
# add --oversubscribe. `-x` forwards environment variables to the remote ranks.
set -euo pipefail
mpirun -np 8 -H node-a:4,node-b:4 --bind-to none --map-by slot --mca mpi_yield_when_idle 1 \
  -x PATH -x LD_LIBRARY_PATH -x OMP_NUM_THREADS=1 \
  python launch/train.py --config configs/demo.json "$@"
