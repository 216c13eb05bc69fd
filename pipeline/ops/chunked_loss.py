"""A head's loss computed by chunks of labels: the [N, C_local] logits and their gradient never exist whole.

`chunked_loss(kind, head, head.loss_features(h), ...)` equals `distributed_loss(kind, head(h), ...)` in
value and in the gradients of the features and of the head's label-sharded parameters, for every head
and loss kind, in plain PyTorch (CPU and GPU). The head splits into its features x [N, k], computed once
with ordinary autograd (replicated layers before them, such as the FFI intermediate layer, get their
gradients through x's backward as usual), and a last layer scored a block of local labels at a time:
z[:, lo:hi] = head.chunk_logits(x, lo, hi) [N, hi - lo], from row slices p[lo:hi] of the sharded
parameters.

Forward (no autograd), per chunk of labels [lo, hi):
- softmax: a running row maximum m [N] and sum of exp(z - m) [N], rescaled by exp(m_old - m_new) when the
  maximum grows (online softmax), and z at the chunk's local (sample, label) target pairs; after the last
  chunk the normaliser that the unfused and fused paths use too (`softmax_normaliser`: a max all-reduce,
  then one all-reduce of [sum of exp, target logits] per sample).
- bce, squared_hinge: the sum per row of the dense term f(z) over the chunk, and z at the target pairs;
  the correction f_target(z) - f(z) at the pairs is added after the loop, then one all-reduce (sum) of
  the partial loss over the group, whose backward is the identity.
Kept for the backward: x, [N]-sized statistics and the target pairs (sorted by label so that a chunk's
pairs are one contiguous run).

Backward, per chunk: z recomputed from a detached x with autograd on; the chunk's loss gradient g [N,
hi - lo] formed in closed form (softmax: w exp(z - m) / S, minus w / |y| at the targets; bce and
squared_hinge: w f'(z), overwritten by w f_target'(z) at the targets), then torch.autograd.grad(z,
[x, p[lo:hi] for each sharded p], g). The gradients are taken at the slice views themselves (their
autograd edges), not at the full parameters, so no full-size zero gradient is made per chunk. dx
accumulates over chunks; a parameter's rows are written into its preallocated full gradient, or, with
`update`, handed to `update(lo, hi, rows)` at once: the full gradient of the head never exists and the
parameters get None (a torch optimizer skips them). The backward can run once.

Cost for a linear head (dense: x = h, k = d; RP: x = h R) with C = C_local labels, relative to the
unfused path (logits, then `distributed_loss`):
- products: forward N k C (the logits), backward N k C (the recompute) + N k C (dx) + N k C (dW):
  4 N k C multiply-adds against 3 N k C, one product more (+33% of the matmul work); an FFI layer of
  fan-in K likewise runs its forward op twice (N K C each) and its backward op once.
- elementwise: the softmax computes exp(z - m) twice per logit (forward, backward), bce and squared
  hinge their terms once in each direction; each chunk is a few passes over an [N, chunk] block.
- memory: three [N, chunk] blocks at most (the chunk's logits, its gradient, the chunk's parameter
  gradient rows [chunk, k]) instead of the unfused [N, C] logits plus the [N, C] buffer of the loss
  (2 N C floats at the peak); plus the sharded parameters' full gradients, unless `update` takes the
  rows. bfloat16 weight rows are widened to float32 per chunk (float32 products and logits).
- collectives: the same as the unfused path (softmax: two all-reduces of [N] and [2, N]; bce and
  squared_hinge: one of a scalar), none in the backward.
- launches: about ten kernels per chunk in each direction, so tiny chunks cost time.
Measured (`launch/bench.py heads`, dense head, CPU, 2 threads, chunk 4096): the step's peak memory
falls to 0.53x of the unfused one at C = 200,000, d = 256, N = 256 (the weight gradient remains) and
to 0.03x with `update`; the step takes 1.4-1.6x the unfused time there and 1.1-1.25x at C = 670,091
(d = 768, N = 128) and C = 3,000,000, where the unfused logits stream through memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch.autograd.graph import GradientEdge, get_gradient_edge

from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.losses import (
    LOSS_KINDS,
    TERMS,
    LossKind,
    all_reduce_in_group,
    label_targets,
    rows_sum,
    softmax_normaliser,
    softmax_targets,
)

if TYPE_CHECKING:
    from pipeline.models.heads.base import Head

RowUpdate = Callable[[int, int, list[torch.Tensor | None]], None]
"""update(lo, hi, grads): the gradient rows [lo, hi) of each sharded parameter, in
`head.sharded_parameters()` order (None for a parameter that does not require grad)."""


class _Setup(NamedTuple):
    """What both directions need: the head, the chunks and the targets, on the features' device."""

    kind: str
    head: Head
    params: list[torch.nn.Parameter]
    chunks: list[tuple[int, int]]  # local label ranges [lo, hi) covering [0, C_local)
    bounds: list[int]  # pairs bounds[i]:bounds[i + 1] lie in chunks[i]
    rows: torch.Tensor  # target pairs sorted by column
    cols: torch.Tensor
    count: torch.Tensor | None  # softmax: |y| [N] (>= 1)
    weight: torch.Tensor  # per-sample weight [N]
    group: dist.ProcessGroup | None
    update: RowUpdate | None
    dtype: torch.dtype  # of the loss arithmetic: float64 for float64 features, else float32


def _slice_edges(
    logits: torch.Tensor, accumulators: dict, wanted: list[int], rows: int
) -> list[GradientEdge]:
    """The autograd edges of the row slices p[lo:hi] that `logits` was computed from, one per wanted
    parameter (given by its gradient accumulator node -> index): the nodes right above the accumulators."""
    found: dict[int, object] = {}
    stack, seen = [logits.grad_fn], set()
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if nxt in accumulators:
                j = accumulators[nxt]
                if found.setdefault(j, node) != node:
                    raise RuntimeError(f"chunk_logits uses sharded parameter {j} twice; expected one slice")
            elif nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    missing = [j for j in wanted if j not in found]
    bad = [j for j in wanted if j in found and "Slice" not in found[j].name()]
    if missing or bad:
        raise RuntimeError(
            f"chunk_logits must use row slices p[lo:hi] of every sharded parameter ({rows} rows); "
            f"parameters {missing} unused, {bad} not sliced first"
        )
    return [GradientEdge(found[j], 0) for j in wanted]


def _rows_by_parameter(
    params: list[torch.nn.Parameter], wanted: list[int], grads: list[torch.Tensor], rows: int
) -> list[torch.Tensor | None]:
    """The chunk's gradient rows [rows, ...] in parameter order (None where no gradient is wanted)."""
    out: list[torch.Tensor | None] = [None] * len(params)
    for j, grad in zip(wanted, grads, strict=True):
        shape = (rows, *params[j].shape[1:])
        if grad.shape != shape:
            raise RuntimeError(f"parameter {j}: row gradient {tuple(grad.shape)}, not {shape}")
        out[j] = grad
    return out


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, setup: _Setup, features: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        n, dtype = features.shape[0], setup.dtype
        rows, cols, bounds = setup.rows, setup.cols, setup.bounds
        target = features.new_empty(rows.numel(), dtype=dtype)  # z at the pairs
        row_max = features.new_full((n,), -torch.inf, dtype=dtype)
        row_sum = features.new_zeros(n, dtype=dtype)  # softmax: sum of exp(z - row_max); else sum of f(z)
        terms = TERMS.get(setup.kind)
        for i, (lo, hi) in enumerate(setup.chunks):
            z = setup.head.chunk_logits(features, lo, hi).to(dtype)
            a, b = bounds[i], bounds[i + 1]
            target[a:b] = z[rows[a:b], cols[a:b] - lo]
            if terms is not None:
                row_sum += terms.dense(z).sum(1)
            else:
                new_max = torch.maximum(row_max, z.amax(1))
                rescaled = torch.where(row_sum > 0, row_sum * torch.exp(row_max - new_max), 0)
                row_sum = rescaled + z.sub_(new_max[:, None]).exp_().sum(1)
                row_max = new_max
            del z  # before the next chunk's logits exist
        weight = setup.weight
        if terms is not None:
            per_row = row_sum + rows_sum(terms.target_fix(target), rows, n)
            loss = all_reduce_in_group((per_row * weight).sum(), setup.group)
            stats = None
        else:
            local_max = row_max.clone()  # all-reduced in place by the normaliser: the global maxima

            def local_sum_exp(m: torch.Tensor) -> torch.Tensor:
                return torch.where(row_sum > 0, row_sum * torch.exp(row_max - m), 0)

            loss, sum_exp = softmax_normaliser(
                local_sum_exp, local_max, target, rows, setup.count, weight, setup.group
            )
            stats = (local_max, sum_exp)
        ctx.setup, ctx.stats = setup, stats
        ctx.save_for_backward(features)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.setup is None:
            raise RuntimeError("the chunked loss's backward recomputes its chunks and can run only once")
        setup, stats, ctx.setup, ctx.stats = ctx.setup, ctx.stats, None, None
        (features,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[1]
        wanted = [j for j in range(len(setup.params)) if ctx.needs_input_grad[2 + j]]
        x = features.detach().requires_grad_(need_x)
        dx = torch.zeros_like(features) if need_x else None
        full: list[torch.Tensor | None] = [None] * len(setup.params)
        if setup.update is None:
            for j in wanted:
                full[j] = torch.empty_like(setup.params[j])  # every row is written by one chunk
        accumulators = {get_gradient_edge(setup.params[j]).node: j for j in wanted}
        rows, cols, bounds = setup.rows, setup.cols, setup.bounds
        scale = setup.weight * grad.to(setup.dtype)
        terms = TERMS.get(setup.kind)
        if terms is None:
            row_max, sum_exp = stats
            prob_scale, target_term = (scale / sum_exp)[:, None], -(scale / setup.count)
        for i, (lo, hi) in enumerate(setup.chunks):
            with torch.enable_grad():
                z = setup.head.chunk_logits(x, lo, hi)
            zc = z.detach().to(setup.dtype)
            a, b = bounds[i], bounds[i + 1]
            r, c = rows[a:b], cols[a:b] - lo
            if terms is None:  # w * (softmax(z) - y / |y|)
                g = (zc - row_max[:, None]).exp_().mul_(prob_scale)
                g.index_put_((r, c), target_term[r], accumulate=True)
            else:
                g = terms.dense_grad(zc).mul_(scale[:, None])
                g.index_put_((r, c), terms.target_grad(zc[r, c]) * scale[r])
            inputs = ([x] if need_x else []) + _slice_edges(z, accumulators, wanted, hi - lo)
            grads = list(torch.autograd.grad(z, inputs, g.to(z.dtype)))
            if need_x:
                dx += grads.pop(0)
            chunk_rows = _rows_by_parameter(setup.params, wanted, grads, hi - lo)
            if setup.update is not None:
                setup.update(lo, hi, chunk_rows)
            else:
                for j in wanted:
                    full[j][lo:hi] = chunk_rows[j]
            del z, zc, g, grads, chunk_rows  # before the next chunk's blocks exist
        return None, dx, *full


def chunked_loss(
    kind: LossKind,
    head: Head,
    features: torch.Tensor,
    label_indptr: torch.Tensor,
    label_indices: torch.Tensor,
    label_range: LabelRange,
    valid: torch.Tensor,
    group: dist.ProcessGroup | None,
    chunk: int,
    update: RowUpdate | None = None,
) -> torch.Tensor:
    """`distributed_loss(kind, head(h), ...)` from features = head.loss_features(h) [N, k], `chunk`
    labels at a time (rounded up to a multiple of `head.label_unit`); see the module docstring.

    label_indptr [N + 1], label_indices (global ids) and valid [N] as for `distributed_loss`. With
    `update`, the sharded parameters' gradient rows go to update(lo, hi, rows) during the backward and
    their .grad stays None. Returns a scalar, float64 for float64 features, else float32.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSS_KINDS}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 labels, got {chunk}")
    if (
        features.shape[0] != valid.numel()
        or label_indptr.numel() != valid.numel() + 1
        or head.label_range.size != label_range.size
    ):
        raise ValueError(
            f"features {tuple(features.shape)}, {label_indptr.numel() - 1} label rows, {valid.numel()} "
            f"valid flags and a head of {head.label_range.size} labels do not fit {label_range.size} "
            "local labels"
        )
    device = features.device
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    count = None
    if kind == "softmax":
        rows, cols, count, weight = softmax_targets(label_indptr, label_indices, label_range, valid, device)
        count = count.to(dtype)
    else:
        rows, cols, weight = label_targets(label_indptr, label_indices, label_range, valid, device)
    order = torch.argsort(cols, stable=True)
    rows, cols = rows[order], cols[order]
    unit = head.label_unit  # chunk boundaries never cut a group of labels that share state
    step, size = -(-chunk // unit) * unit, label_range.size
    starts = list(range(0, size, step))
    edges = torch.tensor(starts + [size], dtype=cols.dtype, device=device)
    bounds = torch.searchsorted(cols, edges).tolist()
    setup = _Setup(
        kind=kind,
        head=head,
        params=list(head.sharded_parameters()),
        chunks=[(lo, min(lo + step, size)) for lo in starts],
        bounds=bounds,
        rows=rows,
        cols=cols,
        count=count,
        weight=weight.to(dtype),
        group=group,
        update=update,
        dtype=dtype,
    )
    return _ChunkedLoss.apply(setup, features, *setup.params)
