"""Model-parallel dense head: per-rank output-layer memory for mp = 1, 2, 4, and step time at 2 ranks vs 1.

Memory: bytes per rank of the DenseHead shard (float32 parameters + gradients + Adam's two moments),
from the shard sizes of the real heads built on the meta device; the Adam factor is measured on a small
head. The largest rank is reported (ranges differ by at most one label).
Time: one training step of the split dense head (all-gather of the embeddings, local logits, softmax
loss, backward, Adam step) on real processes joined by gloo, median over steps of the slowest rank,
with the same global batch at 1 and at 2 ranks (strong scaling). C for the timing is set by
--time-labels (670K labels take tens of seconds per step on a small CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.models.heads.dense import DenseHead
from pipeline.parallel.label_range import LabelRange, split_labels
from pipeline.parallel.losses import distributed_loss
from pipeline.parallel.model_parallel import gather_embeddings

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=int, default=670_091, help="C for the memory figures")
    parser.add_argument("--dim", type=int, default=512, help="embedding width d")
    parser.add_argument("--mps", default="1,2,4", help="model-parallel sizes for the memory figures")
    parser.add_argument("--time-labels", type=int, default=65_536, help="C for the step timing")
    parser.add_argument("--batch", type=int, default=256, help="global batch (split over the ranks)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=2)


def adam_state_factor() -> float:
    """Bytes of Adam state per byte of parameters, measured on a small head after one step."""
    head = DenseHead(16, LabelRange(0, 100, 100))
    opt = torch.optim.Adam(head.parameters())
    head(torch.randn(4, 16)).sum().backward()
    opt.step()
    state = sum(t.nbytes for s in opt.state.values() for t in s.values() if t.dim() > 0)
    return state / sum(p.nbytes for p in head.parameters())


def memory_per_rank(num_labels: int, dim: int, mp: int, adam: float) -> dict:
    sizes = []
    for rank in range(mp):
        with torch.device("meta"):
            head = DenseHead(dim, split_labels(num_labels, mp, rank))
        params = sum(p.numel() * p.element_size() for p in head.parameters())
        sizes.append(params * (2 + adam))  # parameters + gradients + Adam state
    return {"max_bytes": int(max(sizes)), "min_bytes": int(min(sizes))}


def time_steps(world: int, args: argparse.Namespace, threads: int) -> list[float]:
    """Per-step seconds (slowest rank) of `world` worker processes; rank 0 reports them."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {
        "labels": args.time_labels,
        "dim": args.dim,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
    }
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"timing workers failed: {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def worker(spec: dict) -> None:
    """One rank of the timing run: the step of the training loop, reduced to the output layer."""
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD  # one model-parallel group over all ranks
    lr = split_labels(spec["labels"], world, rank)
    head = DenseHead(spec["dim"], lr)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    n = spec["batch"] // world
    x = torch.randn(n, spec["dim"], generator=g)
    counts = torch.full((n * world,), 5)
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, spec["labels"], (int(indptr[-1]),), generator=torch.Generator().manual_seed(0))
    valid = torch.ones(n * world, dtype=torch.bool)
    times = []
    for step in range(spec["warmup"] + spec["steps"]):
        dist.barrier()
        t0 = time.perf_counter()
        h = x.clone().requires_grad_()
        logits = head(gather_embeddings(h, group))
        loss = distributed_loss("softmax", logits, indptr, indices, lr, valid, group)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if step >= spec["warmup"]:
            times.append(elapsed.item())
    if rank == 0:
        print(json.dumps(times), flush=True)
    dist.destroy_process_group()


def run(args: argparse.Namespace) -> dict:
    mps = [int(m) for m in args.mps.split(",")]
    adam = adam_state_factor()
    memory = {mp: memory_per_rank(args.labels, args.dim, mp, adam) for mp in mps}
    base = memory[mps[0]]["max_bytes"] * mps[0]
    print(f"output layer per rank, C={args.labels:,} d={args.dim} (params + grads + Adam {adam:g}x):")
    for mp, m in memory.items():
        print(
            f"  mp={mp}: {m['max_bytes'] / 2**30:.3f} GiB  x mp / (mp=1) = {m['max_bytes'] * mp / base:.6f}"
        )

    runs = {"1rank_1thread": (1, 1), "1rank_2threads": (1, 2), "2ranks_1thread": (2, 1)}
    medians = {}
    print(f"step time, C={args.time_labels:,} d={args.dim} batch={args.batch}, softmax, Adam:")
    for name, (world, threads) in runs.items():
        medians[name] = statistics.median(time_steps(world, args, threads))
        print(f"  {name}: median {medians[name] * 1e3:.1f} ms over {args.steps} steps")
    speedup = {
        f"2ranks_vs_{k}": medians[k] / medians["2ranks_1thread"] for k in runs if k.startswith("1rank")
    }
    for k, v in speedup.items():
        print(f"  speed-up {k}: {v:.2f}x")
    return {
        "memory_labels": args.labels,
        "dim": args.dim,
        "adam_state_factor": adam,
        "bytes_per_rank": {str(mp): m["max_bytes"] for mp, m in memory.items()},
        "bytes_ratio_vs_mp1_times_mp": {str(mp): m["max_bytes"] * mp / base for mp, m in memory.items()},
        "time_labels": args.time_labels,
        "batch": args.batch,
        "step_median_s": medians,
        "speedup": speedup,
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(f"run through the dispatcher: python {ROOT / 'launch' / 'bench.py'} mp")
