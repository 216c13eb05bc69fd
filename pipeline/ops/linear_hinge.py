"""A linear classifier and the squared hinge loss over its labels as one op, with a sparse backward.

loss = distributed_loss("squared_hinge", x W^T + b, ...) with the same value and gradients, for a
linear head (dense, rp) on CPU. The squared hinge max(0, 1 - s z)^2 is flat wherever the margin holds,
and a classifier past its first steps keeps almost every non-target logit below -1: on the Debian
package set 1-3% of the [N, C] entries have a nonzero gradient. The CPU kernel (csrc/linear_hinge.cpp)
makes each chunk of logits in cache, sums the loss and keeps only the violated entries; the backward
is O(nnz k) scatter-adds instead of two [N, C] x [C, k] products over a gradient that is mostly zeros.
What is left of the step is the forward product.

Cost: forward N C k multiply-adds, no [N, C] buffer; the entries kept are 12 bytes each.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.ops.linear_softmax import check_fused_inputs
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.losses import SumOverGroup, label_targets

CHUNK = 512  # labels per chunk: an [N=512, 512] float32 block is 1 MiB


class _LinearSquaredHinge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols, sample_weight, chunk):
        n = x.shape[0]
        indptr = torch.zeros(n + 1, dtype=torch.long)
        indptr[1:] = torch.bincount(rows, minlength=n).cumsum(0)
        row_loss, *entries = torch.ops.xmc.linear_hinge_forward(x, weight, bias, indptr, cols, chunk)
        ctx.chunk, ctx.with_bias = chunk, bias is not None
        ctx.save_for_backward(x, weight, sample_weight, *entries)
        return (row_loss * sample_weight).sum()

    @staticmethod
    def backward(ctx, grad):
        x, weight, sample_weight, *entries = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = torch.ops.xmc.linear_hinge_backward(
            *entries, sample_weight * grad, x, weight, ctx.with_bias, ctx.chunk
        )
        return grad_x, grad_weight, grad_bias if ctx.with_bias else None, *([None] * 4)


def linear_hinge_loss(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    label_indptr: torch.Tensor,
    label_indices: torch.Tensor,
    label_range: LabelRange,
    valid: torch.Tensor,
    group: dist.ProcessGroup | None,
    chunk: int = CHUNK,
) -> torch.Tensor:
    """`distributed_loss("squared_hinge", x @ weight.T + bias, ...)` without the logits: x [N, k]
    float32, weight [label_range.size, k] float32, bias [label_range.size] or None, on CPU."""
    check_fused_inputs(x, weight, label_range, valid)
    rows, cols, sample_weight = label_targets(label_indptr, label_indices, label_range, valid, x.device)
    partial = _LinearSquaredHinge.apply(x.to(weight.dtype), weight, bias, rows, cols, sample_weight, chunk)
    return SumOverGroup.apply(partial, group)
