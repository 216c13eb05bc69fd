"""Chunked loss against whole logits: peak memory and time of one training step of a dense head.

Step = the dense head over C labels and its loss for one batch of N embeddings (forward; backward,
with the embeddings' gradient the backbone needs) and an optimizer step of the head. Variants, on the
same head, weights and batch:
- logits: the head's [N, C] logits, then `distributed_loss` (the unchunked path on every device);
- fused (CPU, softmax or squared hinge, float32 weights): `head_loss(chunk=0)`, the C++ linear + loss
  kernels (`pipeline/ops/linear_softmax.py`: the logits are still written whole, once;
  `pipeline/ops/linear_hinge.py`: never written, the backward over the violated entries only; set
  `--bias` to -2 or -3 for the margins of a trained head, where ~1% of the entries violate them);
- chunked/c: `head_loss(chunk=c)` (`pipeline/ops/chunked_loss.py`), then the optimizer step over the
  full gradients;
- update/c: the same, each chunk's gradient rows applied in the backward (`update`): the head's full
  gradient never exists.
Optimizer: plain SGD, in place (w -= lr g; by rows for update/c) unless `--optimizer adam`
(`HeadOptimizer`: float32 moments, what training runs for bf16 weights or per-chunk updates).

Memory: the peak of the bytes one step allocates on top of what exists before it (weights, batch,
optimizer state), after a warm-up step, for every tensor the step makes (logits, loss buffers,
gradients, temporaries) whatever the allocator keeps cached. CUDA: torch.cuda.max_memory_allocated;
CPU: the running sum of torch.profiler's allocation and free events (profile_memory), in allocation
order. Time: medians over --repeats steps after one warm-up, all variants interleaved in this process
(on CPU with freed memory kept, as the trainer runs: `pipeline/train/allocator.py`), outside the
profiler. Ratios are against `logits` measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time

import torch
import torch.nn.functional as F

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.loss import head_loss
from pipeline.parallel.label_range import split_labels
from pipeline.parallel.losses import distributed_loss
from pipeline.train.allocator import keep_freed_memory
from pipeline.train.head_optimizer import HeadOptimizer

PHASES = ("forward", "backward", "optimizer")
QUICK = {"labels": 20_000, "dim": 64, "batch": 64, "repeats": 2, "chunk": [2048]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=int, default=200_000, help="number of labels C")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension d")
    parser.add_argument("--batch", type=int, default=256, help="samples N")
    parser.add_argument(
        "--chunk", type=int, nargs="+", default=[4096], help="labels per chunk (several: a sweep)"
    )
    parser.add_argument("--loss", choices=["softmax", "bce", "squared_hinge"], default="softmax")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="head weights")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant, after 1 warm-up")
    parser.add_argument("--labels-per-sample", type=int, default=5)
    parser.add_argument(
        "--bias", type=float, default=None, help="start every label's bias here (default: uniform init)"
    )
    parser.add_argument("--variants", nargs="+", default=None, help="a subset: logits fused chunked update")
    parser.add_argument("--skip-memory", action="store_true", help="time only")
    parser.add_argument("--quick", action="store_true", help="C 20,000, d 64, N 64, 2 repeats: a smoke run")


class _SGD:
    """w -= lr * g in place, whole (`step`) or by rows (`step_rows`): no state, no temporaries."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float) -> None:
        self.params, self.lr = params, lr

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad.to(p.dtype), alpha=-self.lr)

    @torch.no_grad()
    def step_rows(self, p: torch.nn.Parameter, lo: int, hi: int, grad: torch.Tensor) -> None:
        p[lo:hi].add_(grad.to(p.dtype), alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


class HeadStep:
    """One dense head, its optimizer and a batch; `step(variant)` runs one training step and returns
    seconds per phase."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.device = args, torch.device(args.device)
        self.label_range = split_labels(args.labels, 1, 0)
        with torch.device("meta"):  # uniform weights drawn in place: the split-independent init is slow
            head = DenseHead(args.dim, self.label_range)
        head = head.to_empty(device=self.device)
        bound = 1 / math.sqrt(args.dim)
        gen = torch.Generator(self.device).manual_seed(0)
        for p in head.parameters():
            p.data.uniform_(-bound, bound, generator=gen)
            p.data = p.data.to(getattr(torch, args.dtype))
        if args.bias is not None:
            head.bias.data.fill_(args.bias)
        self.head = head
        params = list(head.parameters())
        self.optimizer = (
            HeadOptimizer(params, lr=1e-3, kind="adam") if args.optimizer == "adam" else _SGD(params, 1e-3)
        )
        h = torch.randn(args.batch, args.dim, generator=gen, device=self.device)
        indices = torch.randint(
            0, args.labels, (args.batch * args.labels_per_sample,), generator=gen, device=self.device
        )
        indptr = torch.arange(0, indices.numel() + 1, args.labels_per_sample, device=self.device)
        self.batch = GroupBatch(h.requires_grad_(), indptr, indices, torch.ones_like(h[:, 0], dtype=bool))

    def update_rows(self, lo: int, hi: int, grads: list[torch.Tensor | None]) -> None:
        for p, grad in zip(self.head.sharded_parameters(), grads, strict=True):
            self.optimizer.step_rows(p, lo, hi, grad)

    def loss(self, variant: str) -> torch.Tensor:
        head, b, kind, lr = self.head, self.batch, self.args.loss, self.label_range
        if variant == "logits":  # inline: nothing but the loss keeps the logits alive, as in training
            return distributed_loss(
                kind,
                F.linear(b.embeddings.to(head.weight.dtype), head.weight, head.bias),
                b.label_indptr,
                b.label_indices,
                lr,
                b.valid,
                None,
            )
        if variant == "fused":
            return head_loss(head, b, kind, lr, None)
        name, chunk = variant.split("/")
        update = self.update_rows if name == "update" else None
        return head_loss(head, b, kind, lr, None, chunk=int(chunk), update=update)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, variant: str) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.batch.embeddings.grad = None
        self.sync()
        t0 = time.perf_counter()
        loss = self.loss(variant)
        self.sync()
        t1 = time.perf_counter()
        loss.backward()
        self.sync()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.sync()
        t3 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "total": t3 - t0}

    def peak_bytes(self, variant: str) -> int:
        """Bytes one step allocates at its peak beyond what exists before it (after a warm-up step)."""
        self.step(variant)
        self.optimizer.zero_grad(set_to_none=True)
        self.batch.embeddings.grad = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self.step(variant)
            return torch.cuda.max_memory_allocated() - base
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
        ) as prof:
            self.step(variant)
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        allocated = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            allocated += e.nbytes()  # negative for a free
            peak = max(peak, allocated)
        return peak


def median_times(bench: HeadStep, variants: list[str], repeats: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for repeat in range(1 + repeats):
        for v in variants:
            times = bench.step(v)
            if repeat:
                samples[v].append(times)
    return {v: {k: statistics.median(s[k] for s in runs) for k in runs[0]} for v, runs in samples.items()}


def variant_names(args: argparse.Namespace) -> list[str]:
    wanted = args.variants or ["logits", "fused", "chunked", "update"]
    fused = args.loss in ("softmax", "squared_hinge")
    fused_applies = args.device == "cpu" and fused and args.dtype == "float32"
    names = [v for v in ("logits", "fused") if v in wanted and (v != "fused" or fused_applies)]
    for chunk in args.chunk:
        names += [f"{v}/{chunk}" for v in ("chunked", "update") if v in wanted]
    return names


def run(args: argparse.Namespace) -> dict:
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    if args.device == "cpu":
        keep_freed_memory()  # this process only: the memory children run with the default allocator
    variants = variant_names(args)
    bench = HeadStep(args)
    weight_bytes = bench.head.weight.numel() * bench.head.weight.element_size()
    logits_bytes = 4 * args.batch * args.labels
    print(
        f"dense head C={args.labels:,} d={args.dim} N={args.batch} {args.loss} weights {args.dtype} "
        f"({weight_bytes / 2**20:,.0f} MiB) on {args.device}, threads={torch.get_num_threads()}, "
        f"optimizer {args.optimizer}; [N, C] float32 = {logits_bytes / 2**20:,.0f} MiB; median of "
        f"{args.repeats} steps after 1 warm-up"
    )
    medians = median_times(bench, variants, args.repeats)
    peaks = {} if args.skip_memory else {v: bench.peak_bytes(v) for v in variants}
    base = "logits" if "logits" in variants else variants[0]
    print(f"{'variant':>14} {'step ms':>9} {'x time':>7} {'peak MiB':>9} {'x mem':>7}   phases ms")
    figures = {}
    for v in variants:
        m = medians[v]
        time_ratio = m["total"] / medians[base]["total"]
        peak = peaks.get(v)
        mem_ratio = peak / peaks[base] if peak is not None and peaks[base] > 0 else None
        phases = " ".join(f"{p[:3]} {1e3 * m[p]:.1f}" for p in PHASES)
        mem = f"{peak / 2**20:9.1f} {mem_ratio:7.3f}" if mem_ratio is not None else f"{'-':>9} {'-':>7}"
        print(f"{v:>14} {1e3 * m['total']:9.1f} {time_ratio:7.2f} {mem}   {phases}")
        figures[v] = {
            "step_ms": 1e3 * m["total"],
            "phases_ms": {p: 1e3 * m[p] for p in PHASES},
            "time_vs_" + base: time_ratio,
            "peak_bytes": peak,
            "memory_vs_" + base: mem_ratio,
        }
    return {
        "labels": args.labels,
        "dim": args.dim,
        "batch": args.batch,
        "loss": args.loss,
        "device": args.device,
        "dtype": args.dtype,
        "optimizer": args.optimizer,
        "threads": torch.get_num_threads(),
        "weight_bytes": weight_bytes,
        "logits_bytes": logits_bytes,
        "baseline": base,
        "variants": figures,
    }
