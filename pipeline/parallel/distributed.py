"""Start torch.distributed the same way under every launcher.

- `deepspeed` (and torchrun): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set for us.
- `mpirun`: OpenMPI sets OMPI_COMM_WORLD_*; rank 0 picks the rendezvous address and a free port and
  broadcasts them over MPI (mpi4py), then we fill in the same variables and continue as above.
- plain `python launch/train.py`: a world of one, on loopback.

The backend is gloo on CPU and nccl when CUDA is available.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

Launcher = Literal["deepspeed", "mpi", "single"]


@dataclass(frozen=True)
class LaunchInfo:
    launcher: Launcher
    rank: int
    world_size: int
    local_rank: int
    local_size: int


def detect_launcher() -> Launcher:
    if "OMPI_COMM_WORLD_RANK" in os.environ or "PMIX_RANK" in os.environ:
        return "mpi"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "deepspeed"
    return "single"


def env_rank() -> str:
    """This process's rank from the launcher's variables, before or after start-up ('?' if unknown)."""
    for key in ("RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        if key in os.environ:
            return os.environ[key]
    return "0" if detect_launcher() == "single" else "?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_rendezvous() -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    hosts = comm.allgather(socket.gethostname())
    if comm.rank == 0:
        if "MASTER_ADDR" in os.environ:
            addr = os.environ["MASTER_ADDR"]
        elif len(set(hosts)) == 1:
            addr = "127.0.0.1"
        else:
            addr = socket.gethostbyname(socket.gethostname())
        port = os.environ.get("MASTER_PORT") or str(_free_port())
    else:
        addr = port = None
    addr, port = comm.bcast((addr, port), root=0)
    local_rank = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK") or str(
        hosts[: comm.rank].count(hosts[comm.rank])
    )
    os.environ.update(
        RANK=str(comm.rank),
        WORLD_SIZE=str(comm.size),
        LOCAL_RANK=local_rank,
        LOCAL_WORLD_SIZE=str(hosts.count(hosts[comm.rank])),
        MASTER_ADDR=addr,
        MASTER_PORT=port,
    )


def _unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU shared-memory allreduce (0.19) creates one /dev/shm segment per local rank
    (~67 MB) and never unlinks it: every job leaves them behind until /dev/shm is full. Each rank maps
    its peers' segments inside init_distributed, so after a barrier every rank removes its own name;
    the memory stays mapped until the process exits, and nothing is left even after a SIGKILL."""
    dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{dist.get_rank()}"
    Path("/dev/shm", name).unlink(missing_ok=True)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where this rank's tensors for collectives of `group` live: its GPU under nccl (which takes no
    CPU tensors), else the CPU. The trainer, predict and recover keep the head, the labels and every
    reduced number there."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_s: float = 300.0) -> LaunchInfo:
    """Initialise the default process group (through DeepSpeed, so its engines share it)."""
    launcher = detect_launcher()
    if launcher == "mpi":
        _mpi_rendezvous()
    elif launcher == "single":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))

    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    _unlink_deepspeed_shm()
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 0)
    if not local_size:  # the deepspeed launcher does not export it: count ranks on this host
        hosts: list[str] = [""] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
        local_size = hosts.count(socket.gethostname())
    return LaunchInfo(
        launcher, dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), local_size
    )
