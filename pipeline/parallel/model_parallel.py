"""The two collectives of the model-parallel output layer.

Every rank of a model-parallel group scores the embeddings of the whole group against its own label
range, so the forward pass all-gathers the embeddings. Each rank's logits then depend on every rank's
embeddings: the gradient of rank r's embeddings is the sum, over the group, of the gradient rows that
belong to r (a reduce-scatter). Parameters replicated across the group (e.g. the FFI head's
intermediate layer) likewise only see their local labels' share of the gradient and are summed.

Gradient scale in training: the group loss is a mean over the group's samples, and every rank of the
group computes the same loss. DeepSpeed averages the backbone's gradient over all dp x mp ranks, so
also over the mp ranks that computed the same group loss, which would shrink it by 1/mp. Training
therefore gathers with grad_scale = mp, which multiplies the embeddings' gradient by mp on the way
back and undoes exactly that.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

# Tensor reduce-scatter (renamed in torch 2.13). gloo implements it as all-reduce + own chunk: twice
# nccl's traffic, but exact and available on both backends.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group: dist.ProcessGroup | None) -> int:
    """Size of the group; None (no model parallelism) counts as a group of one."""
    return 1 if group is None else dist.get_world_size(group)


class _GatherEmbeddings(torch.autograd.Function):
    """Forward: all-gather rows in group-rank order. Backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        size = dist.get_world_size(group)
        ctx.group, ctx.rows = group, h.shape[0]
        parts = [torch.empty_like(h) for _ in range(size)]
        dist.all_gather(parts, h.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        own = grad.new_empty((ctx.rows, *grad.shape[1:]))
        _reduce_scatter(own, grad.contiguous(), group=ctx.group)
        return own, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def scale_grad(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; multiplies the gradient by `scale` on the way back."""
    return x if scale == 1 else _ScaleGrad.apply(x, scale)


def gather_embeddings(
    h: torch.Tensor, group: dist.ProcessGroup | None, grad_scale: float = 1.0
) -> torch.Tensor:
    """Embeddings [n, d] of this rank -> [size * n, d] of the whole group, in group-rank order.

    Every rank of the group must pass the same n (pad the last batch and mask the padding out of the
    loss with `valid`). The backward returns each rank exactly the summed gradient of its own rows,
    times `grad_scale` (training under DeepSpeed passes the group size, see the module docstring).
    group None or of size one: identity (and the scale).
    """
    h = scale_grad(h, grad_scale)
    if group_size(group) == 1:
        return h
    return _GatherEmbeddings.apply(h, group)


def sum_replicated_grads(params: Iterable[nn.Parameter], group: dist.ProcessGroup | None) -> None:
    """All-reduce (sum) the gradients of parameters replicated across the model-parallel group.

    Each rank's backward only covers the loss terms of its own labels; the full gradient is the sum.
    Call after backward and before the optimizer step (and before any data-parallel averaging).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if group_size(group) == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        g.copy_(new.view_as(g))
