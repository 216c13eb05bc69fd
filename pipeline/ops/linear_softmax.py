"""A linear classifier and its vocab-parallel softmax cross-entropy as one op, by chunks of labels.

loss = distributed_loss("softmax", x W^T + b, ...) with the same value and gradients, for a linear
head: the dense head (x = embeddings) and the random-projection head (x = embeddings R). The CPU
kernel (csrc/linear_softmax.cpp) produces the logits chunk by chunk, each chunk exponentiated against
its own row maxima while it is in cache; the backward forms the gradient of each chunk in place and
multiplies it out in cache too. The [N, C_local] buffer is written once and read once, where the
unfused path streams it through memory about ten times; at C = 200,000, N = 256 that is most of the
step of a slim head (see `launch/bench.py rp`).

What stays here is small: the normaliser across chunks and ranks from the per-chunk (max, sum) pairs
(the same max all-reduce and one all-reduce of [sum exp, target logits] as `distributed_loss`), the
target logits as dot products of the target pairs, and the sparse target term of the gradient,
-(weight / |y|) at each (sample, label) pair, applied with index_add.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.ops.build import load_ops
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.losses import softmax_normaliser, softmax_targets

CHUNK = 1024  # labels per chunk: an [N=256, 1024] float32 block is 1 MiB, inside a core's L2


class _LinearSoftmaxCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rows, cols, count, sample_weight, group, chunk):
        exps, chunk_max, chunk_sum = torch.ops.xmc.linear_softmax_forward(x, weight, bias, chunk)
        n = x.shape[0]
        local_max = chunk_max.amax(1) if chunk_max.shape[1] else x.new_full((n,), -torch.inf)
        rescaled = []

        def local_sum_exp(m: torch.Tensor) -> torch.Tensor:
            rescaled.append(torch.exp(chunk_max - m[:, None]))  # each chunk's sums against the maxima m
            return (chunk_sum * rescaled[0]).sum(1)

        z_target = (x[rows] * weight[cols]).sum(1) + (bias[cols] if bias is not None else 0)
        loss, sum_exp = softmax_normaliser(
            local_sum_exp, local_max, z_target, rows, count, sample_weight, group
        )
        ctx.exps, ctx.chunk, ctx.with_bias = exps, chunk, bias is not None
        ctx.save_for_backward(x, weight, rows, cols, count, sample_weight, rescaled[0], sum_exp)
        return loss

    @staticmethod
    def backward(ctx, grad):
        x, weight, rows, cols, count, sample_weight, rescale, sum_exp = ctx.saved_tensors
        if ctx.exps is None:
            raise RuntimeError("the fused softmax loss's backward consumes its buffer and can run only once")
        exps, ctx.exps = ctx.exps, None
        # d loss / d z = w * (softmax(z) - y / |y|); softmax = exps * rescale / sum_exp per chunk
        coef = sample_weight * grad
        scale = rescale * (coef / sum_exp)[:, None]
        grad_x, grad_weight, grad_bias = torch.ops.xmc.linear_softmax_backward(
            exps, scale, x, weight, ctx.with_bias, ctx.chunk
        )
        t = (coef / count)[rows]  # the target term at each (sample, label) pair
        grad_x.index_add_(0, rows, weight[cols] * -t[:, None])
        grad_weight.index_add_(0, cols, x[rows] * -t[:, None])
        if ctx.with_bias:
            grad_bias.index_add_(0, cols, -t)
        return grad_x, grad_weight, grad_bias if ctx.with_bias else None, *([None] * 6)


def check_fused_inputs(
    x: torch.Tensor, weight: torch.Tensor, label_range: LabelRange, valid: torch.Tensor
) -> None:
    """What every fused linear + loss op checks first (x [N, k], weight [label_range.size, k], valid
    [N]), then loads the C++ ops."""
    if weight.shape[0] != label_range.size or x.shape[0] != valid.numel():
        raise ValueError(
            f"weight {tuple(weight.shape)} and x {tuple(x.shape)} do not fit {label_range.size} local "
            f"labels and {valid.numel()} samples"
        )
    load_ops()


def linear_softmax_loss(
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
    """`distributed_loss("softmax", x @ weight.T + bias, ...)` without the logits: x [N, k] float32,
    weight [label_range.size, k], bias [label_range.size] or None, on CPU."""
    check_fused_inputs(x, weight, label_range, valid)
    targets = softmax_targets(label_indptr, label_indices, label_range, valid, x.device)
    return _LinearSoftmaxCrossEntropy.apply(x.to(weight.dtype), weight, bias, *targets, group, chunk)
