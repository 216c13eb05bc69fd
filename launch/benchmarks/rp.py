"""Random-projection head against a dense head: step time, and bytes per step of the gradient exchange.

Step = the head and its softmax loss over C labels (`head_loss`, as in training), backward (with the
gradient of the embeddings the backbone would need) and an Adam step of the head, for one batch;
medians over repeats after warm-up, all variants interleaved in the same run so that load from other
processes hits them alike. Two paths are timed for both heads:
- fused (what training runs on CPU): `pipeline/ops/linear_softmax.py`, logits produced, exponentiated
  and multiplied out chunk by chunk in cache;
- unfused: the head's [batch, C] logits, then `distributed_loss` over them: the logits stream through
  memory about ten times, a cost both heads share (Amdahl), which is what held the ratio down.
The RP head multiplies in the cheap order, (h R) V^T: batch*d*k + batch*k*C multiply-adds.
On CPU, glibc hands every [batch, C] float32 tensor (205 MB at the defaults) back to the kernel when
it is freed and page-faults it in, zeroed, at the next allocation. The trainer switches this off
(`pipeline/train/allocator.py`, as a caching allocator, jemalloc or tcmalloc would), and so does this
bench by default; `--no-keep-freed-memory` measures without.

Bytes: one step of the Horovod exchange (`GradientExchange`) of the RP head's gradients per
compression mode, counted by its own accounting. With a single process Horovod has one replica, so
the exchange is driven through `GradientExchange.average`, which runs the same collectives
(allreduce/allgather over a process set of one) and counts the same payload a replica would send.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.loss import head_loss
from pipeline.models.heads.rp import RPHead
from pipeline.parallel.label_range import split_labels
from pipeline.parallel.losses import distributed_loss
from pipeline.train.allocator import keep_freed_memory

PHASES = ("forward", "backward", "optimizer")
PATHS = ("fused", "unfused")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=int, default=200_000, help="number of labels C")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64, help="projected dimension k of the RP head")
    parser.add_argument("--embed", type=int, default=512, help="embedding dimension d")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant, after 2 warm-up")
    parser.add_argument("--labels-per-sample", type=int, default=5)
    parser.add_argument("--topk-fraction", type=float, default=0.01)
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="glibc: serve large tensors from the heap and keep freed memory (no mmap/munmap and page "
        "faults per [batch, C] tensor, as a caching allocator would); affects all variants alike",
    )


class StepTimer:
    """One head, its Adam optimizer, the batch and the loss path; `step()` returns seconds per phase."""

    def __init__(self, head: torch.nn.Module, batch: tuple, path: str) -> None:
        self.head, self.batch, self.path = head, batch, path
        # fused Adam, for both heads: on CPU about 7x faster than the default multi-tensor one
        self.optimizer = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)

    def loss(self) -> torch.Tensor:
        h, indptr, indices, valid = self.batch
        if self.path == "fused":
            return head_loss(self.head, GroupBatch(*self.batch), "softmax", self.head.label_range, None)
        return distributed_loss("softmax", self.head(h), indptr, indices, self.head.label_range, valid, None)

    def step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        loss = self.loss()
        t1 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.batch[0].grad = None
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}


def make_batch(args: argparse.Namespace) -> tuple:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(args.batch, args.embed, generator=gen).requires_grad_()
    indices = torch.randint(0, args.labels, (args.batch * args.labels_per_sample,), generator=gen)
    indptr = torch.arange(0, indices.numel() + 1, args.labels_per_sample)
    return h, indptr, indices, torch.ones(args.batch, dtype=torch.bool)


def time_heads(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Median seconds per phase of each (head, path), keyed "dense/fused" etc."""
    label_range = split_labels(args.labels, 1, 0)
    batch = make_batch(args)
    heads = {
        "dense": DenseHead(args.embed, label_range),
        "rp": RPHead(args.embed, label_range, args.dim, seed=0),
    }
    timers = {
        f"{name}/{path}": StepTimer(head, batch, path) for name, head in heads.items() for path in PATHS
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in timers}
    for repeat in range(2 + args.repeats):
        for name, timer in timers.items():
            times = timer.step()
            if repeat >= 2:
                samples[name].append(times)
    return {
        name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
        for name, runs in samples.items()
    }


def exchange_bytes(args: argparse.Namespace) -> dict[str, int]:
    import horovod.torch as hvd

    from pipeline.parallel.gradient_exchange import GradientExchange

    if not hvd.is_initialized():
        hvd.init()
    head = RPHead(args.embed, split_labels(args.labels, 1, 0), args.dim, seed=0)
    h, indptr, indices, valid = make_batch(args)
    distributed_loss("softmax", head(h), indptr, indices, head.label_range, valid, None).backward()
    sent = {}
    for mode in ("none", "fp16", "bf16", "topk"):
        exchange = GradientExchange(
            head.named_parameters(), hvd.global_process_set, mode, topk_fraction=args.topk_fraction
        )
        exchange.step_bytes = 0
        for name, p in exchange.params:
            exchange.average(name, p.grad)
        sent[mode] = exchange.step_bytes
    return sent


def run(args: argparse.Namespace) -> dict:
    if args.keep_freed_memory:
        keep_freed_memory()
    print(
        f"C={args.labels} batch={args.batch} d={args.embed} k={args.dim} threads={torch.get_num_threads()}, "
        f"median of {args.repeats} steps after 2 warm-up, keep freed memory: {args.keep_freed_memory}"
    )
    medians = time_heads(args)
    ratios = {}
    for path in PATHS:
        for name in ("dense", "rp"):
            m = medians[f"{name}/{path}"]
            phases = "  ".join(f"{p} {1e3 * m[p]:7.1f}" for p in PHASES)
            print(f"{path:>7} {name:>5} step {1e3 * m['total']:8.1f} ms   ({phases} ms)")
        ratios[path] = medians[f"dense/{path}"]["total"] / medians[f"rp/{path}"]["total"]
    print(
        f"speed-up of the RP step: {ratios['fused']:.2f}x fused (as trained; target >= 6x at d/k = "
        f"{args.embed / args.dim:g}), {ratios['unfused']:.2f}x unfused"
    )

    sent = exchange_bytes(args)
    for mode, n in sent.items():
        print(f"exchange {mode:>4}: {n:>12,d} bytes/step  ({sent['none'] / n:6.1f}x fewer than none)")
    dense_none = (args.labels * args.embed + args.labels) * 4  # float32 weight + bias, uncompressed
    print(
        f"(dense head, none: {dense_none:,d} bytes/step, {dense_none / sent['topk']:.0f}x the RP head's topk)"
    )
    return {
        "labels": args.labels,
        "batch": args.batch,
        "embed": args.embed,
        "dim": args.dim,
        "threads": torch.get_num_threads(),
        "keep_freed_memory": args.keep_freed_memory,
        "dense_step_ms": 1e3 * medians["dense/fused"]["total"],
        "rp_step_ms": 1e3 * medians["rp/fused"]["total"],
        "speedup": ratios["fused"],
        "speedup_unfused": ratios["unfused"],
        "phases_ms": {name: {p: 1e3 * m[p] for p in (*PHASES, "total")} for name, m in medians.items()},
        "exchange_bytes": sent,
        "topk_reduction": sent["none"] / sent["topk"],
        "dense_none_bytes": dense_none,
    }
