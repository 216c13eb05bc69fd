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
`calibrate_recovery` then fixes W's scale where the slim model is not at its optimum, and mixes in
the back-projection V R^T where that fits the training data better.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.rp import RPHead
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.losses import LossKind, distributed_loss


def recover_dense_head(
    rp_head: RPHead,
    batches: Iterable[GroupBatch],
    lam: float,
    group: dist.ProcessGroup | None = None,
    dp_group: dist.ProcessGroup | None = None,
    loss: LossKind = "softmax",
) -> DenseHead:
    """The recovered dense head for rp_head's label range: W = -(1/(lam n)) sum_i g_i h_i^T.

    `batches` yields the model-parallel group's gathered batches (`group_batches`: h, label_indptr,
    label_indices, valid), exactly what the head sees in training: h [N, d] the embeddings of the
    whole group (no autograd needed), the N samples' labels as CSR of global ids, valid [N]
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


def back_projection(rp_head: RPHead) -> torch.Tensor:
    """V R^T [C_local, d]: the dense weight whose logits on h equal the slim head's, (h R) V^T."""
    return rp_head.weight @ rp_head.projection.t().to(rp_head.weight.dtype)


def calibrate_recovery(
    dual: torch.Tensor,
    slim: RPHead,
    loss_kind: LossKind,
    label_range: LabelRange,
    group: dist.ProcessGroup | None,
    batches: Iterable[GroupBatch],
    max_batches: int = 16,
) -> tuple[float, float]:
    """(a, b) minimising the training loss of (a W_dual + b V R^T) h + bias over the first
    `max_batches` group batches; a in {0} or a power of 2 in 2^-20 .. 2^8, b in {0, 1}.

    The dual formula gives W's direction; its scale is right only at the optimum of the regularised
    slim problem. After a finite number of Adam steps the slim model is not there: W h can be off by
    orders of magnitude, and far from the optimum the dual direction itself can be worse than the
    slim model. The back-projection V R^T reproduces the slim model's logits exactly, so with b = 1,
    a = 0 among the candidates the recovered head is never worse on the training loss than the slim
    one, and where the dual direction adds information (a > 0) it is kept. At the optimum the search
    returns a about 1. Every rank of the group evaluates the same candidates (the loss all-reduces
    over the group); sums over data-parallel replicas are all-reduced at the end, so every rank of the
    world returns the same pair. Collective over the world."""
    powers = [2.0**e for e in range(-20, 9)]
    candidates = [(a, 0.0) for a in powers] + [(0.0, 1.0)] + [(a, 1.0) for a in powers]
    # summed losses per candidate, then the sample count; on the device of the collectives
    totals = torch.zeros(len(candidates) + 1, dtype=torch.float64, device=dual.device)
    bias = slim.bias if slim.bias is not None else 0.0
    projected = back_projection(slim)
    with torch.no_grad():
        for i, (h, indptr, indices, valid) in enumerate(batches):
            if i == max_batches:
                break
            wh, bp = h @ dual.t(), h @ projected.t()
            n = valid.sum()
            for j, (a, b) in enumerate(candidates):
                logits = wh * a + bp * b + bias
                loss = distributed_loss(loss_kind, logits, indptr, indices, label_range, valid, group)
                totals[j] += loss.double() * n
            totals[-1] += n
    if group is not None:  # each model-parallel group saw its own batches: sum over the whole world
        totals /= dist.get_world_size(group)
    dist.all_reduce(totals)
    return candidates[int(torch.argmin(totals[:-1]))]
