"""A start-up check that every communication path this job relies on really works.

Run once on every rank after start-up: a torch.distributed allreduce over the world and over each
grid group, and a Horovod allreduce with fp16 compression. Inputs are small integers and halves,
exactly representable in fp16, so every expected result is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from pipeline.parallel.distributed import Peer, collective_device
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.horovod import horovod_iface


class SelfCheckError(RuntimeError):
    pass


def _expect(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not torch.equal(got.cpu(), want):
        raise SelfCheckError(f"self-check {name}: got {got.tolist()}, expected {want.tolist()}")


def run_self_check(grid: ProcessGrid, me: Peer) -> dict[str, Any]:
    """Check every path on this rank (collective); returns this rank's report: where it runs (`me`:
    host, address, the interface of its Gloo traffic and of Horovod's), grid place, results."""
    import horovod.torch as hvd

    rank, world = grid.rank, grid.world_size
    dev = collective_device()  # nccl takes GPU tensors only
    x = torch.tensor([rank + 1.0, 2.0 * rank], device=dev)
    dist.all_reduce(x)
    _expect("torch allreduce (world)", x, torch.tensor([world * (world + 1) / 2, float(world * (world - 1))]))

    mp_ranks = grid.layout.mp_group_ranks(grid.dp_rank)
    y = torch.tensor([float(rank)], device=dev)
    dist.all_reduce(y, group=grid.mp_group)
    _expect("torch allreduce (model-parallel group)", y, torch.tensor([float(sum(mp_ranks))]))

    dp_ranks = grid.layout.dp_group_ranks(grid.mp_rank)
    z = torch.tensor([float(rank)], device=dev)
    dist.all_reduce(z, group=grid.dp_group)
    _expect("torch allreduce (data-parallel group)", z, torch.tensor([float(sum(dp_ranks))]))

    h = torch.tensor([rank + 0.5, -2.0 * rank, 1024.0])
    avg = hvd.allreduce(h, name="selfcheck.fp16", op=hvd.Average, compression=hvd.Compression.fp16)
    _expect("horovod allreduce (fp16)", avg, torch.tensor([world / 2.0, -(world - 1.0), 1024.0]))

    from pipeline.parallel.horovod import dp_process_set

    d = hvd.allreduce(torch.ones(1), name="selfcheck.dp", op=hvd.Sum, process_set=dp_process_set())
    _expect("horovod allreduce (data-parallel process set)", d, torch.tensor([float(grid.dp)]))

    return {
        "rank": rank,
        "host": me.host,
        "addr": me.addr,
        "gloo_iface": me.iface,
        "horovod_iface": horovod_iface(),
        "world_size": world,
        "horovod_rank": hvd.rank(),
        "horovod_size": hvd.size(),
        "dp": grid.dp,
        "mp": grid.mp,
        "dp_rank": grid.dp_rank,
        "mp_rank": grid.mp_rank,
        "torch_allreduce": x.tolist(),
        "horovod_allreduce_fp16": avg.tolist(),
        "horovod_dp_allreduce": d.tolist(),
    }
