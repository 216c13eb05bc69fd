"""Recover a full-size classifier W (C x d) from a trained random-projection head in one pass.

Dual random projection (Zhang, Mahdavi, Jin, Yang, Zhu, "Recovering the Optimal Solution by Dual
Random Projection", COLT 2013), as used for the RP classifier of Yuan et al. (ECCV 2020). For the
L2-regularised problem  min_W (1/n) sum_i loss(W h_i) + (lam/2) ||W||^2  the optimality condition is
W = -(1/(lam n)) sum_i g_i h_i^T, with g_i the gradient of the loss w.r.t. sample i's logits: the dual
variables. The projected problem on z = R^T h has the same form, and its dual variables (computed
from the slim model's logits) approximate the full problem's; plugging them into the formula with the
original embeddings h gives W. The gradients come from `distributed_loss` through autograd, so every
loss kind works unchanged (for softmax, g_i = p_i - y_i / |y_i|).

The slim model's bias is copied as it is (it is not regularised and lives in the same logit space).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.rp import RPHead
from pipeline.parallel.losses import LossKind, distributed_loss

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def recover_dense_head(
    rp_head: RPHead,
    batches: Iterable[Batch],
    lam: float,
    group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    loss: LossKind = "softmax",
) -> DenseHead:
    """The recovered dense head for rp_head's label range: W = -(1/(lam n)) sum_i g_i h_i^T.

    `batches` yields (h, label_indptr, label_indices, valid) of the model-parallel group's gathered
    batch, exactly what the head sees in training: h [N, d] the embeddings of the whole group
    (`gather_embeddings`, no autograd needed), the N samples' labels as CSR of global ids, valid [N]
    bool marking real (non-padding) samples; identical on every rank of `group`, which must all
    iterate in step (the loss all-reduces over `group`). Over the data-parallel replicas (`dp_group`,
    the ranks holding the same label range) the partial sums and sample counts are summed, so each
    training sample must be seen by exactly one model-parallel group. `lam` is the L2 coefficient of
    the objective above, the one the slim model was trained with ((lam/2)||V||^2 on the mean loss,
    i.e. plain weight decay lam for SGD); it scales W, and lam <= 0 is meaningless. `loss` is the
    training loss kind. The recovery is accurate when the logits are moderate: its error grows with
    the distortion of the projection (about sqrt(rank / k) for data near a low-rank subspace) times
    how far the duals move with the logits (see tests/test_rp.py for figures).
    """
    if lam <= 0:
        raise ValueError(f"lam must be positive, got {lam}")
    weight = rp_head.weight
    w_sum = torch.zeros(weight.shape[0], rp_head.in_features, dtype=weight.dtype, device=weight.device)
    n_valid = torch.zeros((), dtype=torch.float64, device=weight.device)
    for h, label_indptr, label_indices, valid in batches:
        h = h.detach().to(weight.dtype)
        valid = valid.to(torch.bool)
        with torch.no_grad():
            logits = rp_head(h)
        logits.requires_grad_(True)
        with torch.enable_grad():
            mean_loss = distributed_loss(
                loss, logits, label_indptr, label_indices, rp_head.label_range, valid, group
            )
            count = valid.sum()
            (grad,) = torch.autograd.grad(mean_loss * count, logits)  # sum form: g_i per valid sample
        w_sum.addmm_(grad[valid].t().to(w_sum.dtype), h[valid])
        n_valid += count
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(w_sum, group=dp_group)
        dist.all_reduce(n_valid, group=dp_group)
    if n_valid.item() == 0:
        raise ValueError("recovery saw no valid sample")
    with torch.device("meta"):  # skip the dense head's random initialisation: every value is set below
        dense = DenseHead(rp_head.in_features, rp_head.label_range, bias=rp_head.bias is not None)
    dense = dense.to_empty(device=weight.device).to(dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(w_sum.mul_(-1.0 / (lam * n_valid.item())))
        if rp_head.bias is not None:
            dense.bias.copy_(rp_head.bias)
    return dense
