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
  exponentials, the target logits and |y|; the gradient softmax(z) - y / |y| is formed locally.
- bce: sum over all C labels of BCE-with-logits(z_l, [l in y]).
- squared_hinge: sum over all C labels of max(0, 1 - s_l z_l)^2, s_l = +1 if l in y else -1.
  Both are sums of per-label terms: the local part is summed across the group with an all-reduce
  whose backward is the identity (no other rank's terms depend on our logits).

Label ids are a set per sample: duplicates count once.
"""

from __future__ import annotations

from typing import Literal

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
    """Dense 0/1 targets [N, label_range.size] of the labels in this rank's range."""
    n = label_indptr.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=label_indptr.device), torch.diff(label_indptr))
    mine = (label_indices >= label_range.start) & (label_indices < label_range.stop)
    y = torch.zeros(n, label_range.size, dtype=dtype, device=label_indices.device)
    y[rows[mine], label_indices[mine] - label_range.start] = 1
    return y


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce (sum) of the ranks' partial losses. Backward: identity."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        return _all_reduce(partial.clone(), group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Vocab-parallel cross-entropy against y / |y|, weighted per sample by `weight` [N]."""

    @staticmethod
    def forward(ctx, z, y, weight, group):
        m = z.max(dim=1).values if z.shape[1] else torch.full_like(weight, -torch.inf)
        m = _all_reduce(m.detach().clone(), group, dist.ReduceOp.MAX)
        shifted = z - m[:, None]
        exp = shifted.exp()
        # One all-reduce of [sum exp(z - m), sum_{l in y} (z_l - m), |y|] per sample.
        sums = _all_reduce(torch.stack([exp.sum(1), (shifted * y).sum(1), y.sum(1)]), group)
        sum_exp, target_sum, count = sums
        has_labels = count > 0
        per_sample = torch.where(has_labels, sum_exp.log() - target_sum / count.clamp(min=1), 0)
        weight = weight * has_labels
        ctx.save_for_backward(exp.div_(sum_exp[:, None]), y, count.clamp(min=1), weight)
        return (per_sample * weight).sum()

    @staticmethod
    def backward(ctx, grad):
        p, y, count, weight = ctx.saved_tensors  # d loss / d z = weight * (softmax(z) - y / |y|)
        return (p - y / count[:, None]) * (weight * grad)[:, None], None, None, None


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
    z = logits_local.float()
    indptr, indices, valid = (t.to(z.device) for t in (label_indptr, label_indices, valid))
    y = local_targets(indptr, indices, label_range, z.dtype)
    weight = valid.to(z.dtype) / valid.sum().clamp(min=1)
    if kind == "softmax":
        return _SoftmaxCrossEntropy.apply(z, y, weight, group)
    if kind == "bce":
        per_label = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    elif kind == "squared_hinge":
        per_label = F.relu(1 - (2 * y - 1) * z).square()
    else:
        raise ValueError(f"unknown loss {kind!r}; expected one of {LOSS_KINDS}")
    return _SumOverGroup.apply((per_label.sum(1) * weight).sum(), group)
