"""Losses over logits split by label range across the model-parallel group.

Each rank holds logits [N, C_local] for its labels [start, stop) over the gathered batch of N samples,
and the batch's targets as CSR (global label ids); it builds its own slice of the targets. Every rank
of the group returns the same loss value, and the gradient w.r.t. its local logits equals the
single-process gradient restricted to its labels.

Normalisation (all kinds): loss = sum over samples with valid=True of the per-sample loss / number of
valid samples in the gathered batch (0 if there is none); padding samples (valid=False) contribute
neither value nor gradient. Per-sample losses, with y the sample's label set and z its logits:

- softmax: cross-entropy against targets y / |y| (multi-class when |y| = 1):
  logsumexp(z) - mean_{l in y} z_l. A sample without labels contributes 0 (and still counts as valid).
  Computed the vocab-parallel way: max all-reduce, then one all-reduce of the shifted sum of
  exponentials and the target logits; the gradient softmax(z) - y / |y| is formed locally.
- bce: sum over all C labels of BCE-with-logits(z_l, [l in y]).
- squared_hinge: sum over all C labels of max(0, 1 - s_l z_l)^2, s_l = +1 if l in y else -1.
  Both are sums of per-label terms: the local part is summed across the group with an all-reduce
  whose backward is the identity (no other rank's terms depend on our logits).

Label ids are a set per sample: duplicates count once; ids outside [0, num_labels) are ignored.

Cost: the logits are [N, C_local] with C_local up to 10^5..10^6, while a sample has a handful of
labels, so no dense target matrix or [N, C] mask is built. Each loss is "a dense term over all labels"
plus "a correction at the (row, label) target pairs". The softmax keeps a single [N, C_local] buffer:
exp(z - max) in the forward, turned in place into the gradient in the backward (which can therefore
run once: there is no retain_graph use of the loss). bce and squared_hinge save only the logits (no
extra [N, C_local] tensor between forward and backward) and form the gradient in one new buffer.
Row-blocked variants (temporaries that stay in cache) were measured and lost on a loaded 2-core
machine: many small parallel kernels wait on each other more than the memory passes they save.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.model_parallel import group_size

LossKind = Literal["softmax", "bce", "squared_hinge"]
LOSS_KINDS: tuple[str, ...] = ("softmax", "bce", "squared_hinge")


def local_targets(
    label_indptr: torch.Tensor, label_indices: torch.Tensor, label_range: LabelRange, dtype: torch.dtype
) -> torch.Tensor:
    """Dense 0/1 targets [N, label_range.size] of the labels in this rank's range (for tests and
    small problems; the losses use `target_pairs`)."""
    rows, cols, _ = target_pairs(label_indptr, label_indices, label_range)
    y = torch.zeros(label_indptr.numel() - 1, label_range.size, dtype=dtype, device=label_indices.device)
    y[rows, cols] = 1
    return y


def target_pairs(
    label_indptr: torch.Tensor, label_indices: torch.Tensor, label_range: LabelRange
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, local columns) of the distinct (sample, label) pairs in this rank's range, and |y| [N],
    the number of distinct labels of each sample over all ranges (the CSR is the same on every rank,
    so no all-reduce is needed for it)."""
    n, total = label_indptr.numel() - 1, label_range.num_labels
    rows = torch.repeat_interleave(torch.arange(n, device=label_indptr.device), torch.diff(label_indptr))
    known = (label_indices >= 0) & (label_indices < total)
    pairs = torch.unique(rows[known] * max(total, 1) + label_indices[known])
    rows, labels = pairs // max(total, 1), pairs % max(total, 1)
    count = torch.bincount(rows, minlength=n)
    mine = (labels >= label_range.start) & (labels < label_range.stop)
    return rows[mine], labels[mine] - label_range.start, count


def all_reduce_in_group(
    t: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM
) -> torch.Tensor:
    """In-place all-reduce of t over the model-parallel group (a no-op for a group of one); returns t."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def rows_sum(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of values per row id, [n]."""
    return values.new_zeros(n).index_add_(0, rows, values)


def softmax_normaliser(
    local_sum_exp: Callable[[torch.Tensor], torch.Tensor],
    local_max: torch.Tensor,
    target_logits: torch.Tensor,
    rows: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vocab-parallel softmax cross-entropy from each rank's partial sums, shared by the fused
    and unfused paths: one max all-reduce of the row maxima local_max [N], then one all-reduce of
    [sum over local labels of exp(z - m), sum over local targets of (z_l - m)] per sample.

    local_sum_exp(m) returns this rank's sum of exp(z - m) per row [N] against the global maxima m;
    target_logits are z at the local target pairs (rows). Returns (weighted loss, the global
    sums of exponentials [N])."""
    n = local_max.shape[0]
    m = all_reduce_in_group(local_max, group, dist.ReduceOp.MAX)
    target = rows_sum(target_logits - m[rows], rows, n)
    sum_exp, target_sum = all_reduce_in_group(torch.stack([local_sum_exp(m), target]), group)
    per_sample = torch.where(weight > 0, sum_exp.log() - target_sum / count, 0)
    return (per_sample * weight).sum(), sum_exp


class SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce (sum) of the ranks' partial losses. Backward: identity."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        return all_reduce_in_group(partial.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Vocab-parallel cross-entropy against y / |y|, weighted per sample by `weight` [N].

    y is given as target pairs (rows, cols) and |y| as count [N] (>= 1 where weight > 0).
    """

    @staticmethod
    def forward(ctx, z, rows, cols, count, weight, group):
        n = z.shape[0]
        local_max = z.amax(dim=1) if z.shape[1] else z.new_full((n,), -torch.inf)
        buffers = []

        def local_sum_exp(m: torch.Tensor) -> torch.Tensor:
            buffers.append(torch.sub(z, m[:, None]).exp_())  # the one [N, C_local] buffer
            return buffers[0].sum(1)

        loss, sum_exp = softmax_normaliser(
            local_sum_exp, local_max, z[rows, cols], rows, count, weight, group
        )
        # Kept on ctx, not saved: the backward overwrites it with the gradient.
        ctx.exp = buffers[0]
        ctx.save_for_backward(rows, cols, count, weight, sum_exp)
        return loss

    @staticmethod
    def backward(ctx, grad):
        rows, cols, count, weight, sum_exp = ctx.saved_tensors
        if ctx.exp is None:
            raise RuntimeError("the softmax loss's backward reuses its buffer and can run only once")
        g, ctx.exp = ctx.exp, None
        # d loss / d z = weight * (exp / sum_exp - y / |y|)
        scale = weight * grad
        g.mul_((scale / sum_exp)[:, None])
        g.index_put_((rows, cols), -(scale / count)[rows], accumulate=True)
        return g, None, None, None, None, None


class _SparseTargetLoss(torch.autograd.Function):
    """Per-label loss as a dense term over all labels plus a correction at the target pairs, weighted
    per row. Only the logits are saved; the backward forms the gradient in one new buffer."""

    @staticmethod
    def forward(ctx, z, rows, cols, weight, kind):
        terms = TERMS[kind]
        per_row = terms.dense(z).sum(1) + rows_sum(terms.target_fix(z[rows, cols]), rows, z.shape[0])
        ctx.terms = terms
        ctx.save_for_backward(z, rows, cols, weight)
        return (per_row * weight).sum()

    @staticmethod
    def backward(ctx, grad):
        z, rows, cols, weight = ctx.saved_tensors
        scale = weight * grad
        g = ctx.terms.dense_grad(z).mul_(scale[:, None])
        g.index_put_((rows, cols), ctx.terms.target_grad(z[rows, cols]) * scale[rows])
        return g, None, None, None, None


class Terms(NamedTuple):
    """A per-label loss as f(z) for every label (the non-target term), plus f_target(z) - f(z) at the
    targets; the gradient f'(z) everywhere, overwritten by f_target'(z) at the targets. Elementwise,
    so any block of labels can be evaluated on its own (`pipeline.ops.chunked_loss`)."""

    dense: Callable[[torch.Tensor], torch.Tensor]
    target_fix: Callable[[torch.Tensor], torch.Tensor]
    dense_grad: Callable[[torch.Tensor], torch.Tensor]
    target_grad: Callable[[torch.Tensor], torch.Tensor]


TERMS = {
    # BCE(z, 0) = softplus(z), BCE(z, 1) = softplus(-z) = softplus(z) - z
    "bce": Terms(
        dense=F.softplus,
        target_fix=torch.neg,
        dense_grad=torch.sigmoid,
        target_grad=lambda z: -torch.sigmoid(-z),
    ),
    # max(0, 1 + z)^2 for a non-target label, max(0, 1 - z)^2 for a target
    "squared_hinge": Terms(
        dense=lambda z: (z + 1).clamp_(min=0).square_(),
        target_fix=lambda z: (1 - z).clamp_(min=0).square_() - (z + 1).clamp_(min=0).square_(),
        dense_grad=lambda z: (z + 1).clamp_(min=0).mul_(2),
        target_grad=lambda z: (1 - z).clamp_(min=0).mul_(-2),
    ),
}


def distributed_loss(
    kind: LossKind,
    logits_local: torch.Tensor,
    label_indptr: torch.Tensor,
    label_indices: torch.Tensor,
    label_range: LabelRange,
    valid: torch.Tensor,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Mean per valid sample of the `kind` loss over all labels of the group (see the module docstring).

    logits_local [N, label_range.size]; label_indptr [N + 1] and label_indices (int64, global ids) of
    the same N samples, identical on every rank of the group; valid [N] bool (labels and mask may live
    on another device than the logits). Returns a float32 scalar.
    """
    if logits_local.shape != (valid.numel(), label_range.size) or label_indptr.numel() != valid.numel() + 1:
        raise ValueError(
            f"logits {tuple(logits_local.shape)}, {label_indptr.numel() - 1} label rows and "
            f"{valid.numel()} valid flags do not fit {label_range.size} local labels"
        )
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSS_KINDS}")
    z = logits_local.float()
    if kind == "softmax":
        targets = softmax_targets(label_indptr, label_indices, label_range, valid, z.device)
        return _SoftmaxCrossEntropy.apply(z, *targets, group)
    rows, cols, weight = label_targets(label_indptr, label_indices, label_range, valid, z.device)
    return SumOverGroup.apply(_SparseTargetLoss.apply(z, rows, cols, weight, kind), group)


def label_targets(
    label_indptr: torch.Tensor,
    label_indices: torch.Tensor,
    label_range: LabelRange,
    valid: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the per-label losses (bce, squared_hinge) need of the targets, on `device`: the local target
    pairs (rows, cols) and the per-sample weight [N] float32 (1 / number of valid samples, 0 for
    padding)."""
    indptr, indices, valid = (t.to(device) for t in (label_indptr, label_indices, valid))
    rows, cols, _ = target_pairs(indptr, indices, label_range)
    return rows, cols, valid.float() / valid.sum().clamp(min=1)


def softmax_targets(
    label_indptr: torch.Tensor,
    label_indices: torch.Tensor,
    label_range: LabelRange,
    valid: torch.Tensor,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the softmax loss needs of the targets, on `device`: the local target pairs (rows, cols),
    |y| per sample (float32, >= 1) and the per-sample weight [N] (1 / number of valid samples; 0 for
    padding and for a sample without labels, which contributes 0 and still counts as valid)."""
    indptr, indices, valid = (t.to(device) for t in (label_indptr, label_indices, valid))
    rows, cols, count = target_pairs(indptr, indices, label_range)
    weight = valid.float() / valid.sum().clamp(min=1) * (count > 0)
    return rows, cols, count.clamp(min=1).float(), weight
