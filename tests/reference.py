"""Plain single-process references that the tests and launch/gpu/check_cuda.py compare against.

Each function is written from the definition, over all labels at once: dense 0/1 targets, dense or
gathered weights, float64 where stated. None of them calls pipeline code, so they are independent of
the label sharding, chunking, fusing, sparse target handling and kernels under test. Imports only
torch: check_cuda.py runs on GPU machines that lack the training stack.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------- targets and losses


def dense_targets(indptr: torch.Tensor, indices: torch.Tensor, num_labels: int) -> torch.Tensor:
    """0/1 targets [N, num_labels] float32 on the CPU from CSR labels (indptr [N + 1], indices of label ids
    in [0, num_labels)), built label by label: a label listed twice counts once. Independent of the
    losses' sparse targets (target_pairs)."""
    y = torch.zeros(indptr.numel() - 1, num_labels)
    for row in range(indptr.numel() - 1):
        for label in indices[indptr[row] : indptr[row + 1]].tolist():
            y[row, label] = 1
    return y


def reference_loss(
    kind: str, z: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Mean over valid samples of the per-sample loss on the full logits z [N, C] (any float dtype; the
    result has z's dtype and is differentiable in z), with CSR labels (indptr [N + 1], indices in
    [0, C)) and valid [N] bool; 0 when no sample is valid.

    - softmax / multiclass: -(y / max(|y|, 1)) . log_softmax(z) (a sample without labels adds 0),
    - bce: sum over labels of binary_cross_entropy_with_logits(z, y),
    - squared_hinge: sum over labels of max(0, 1 - (2y - 1) z)^2.

    Plain torch over all labels on one process: independent of the label split, of the groups'
    all-reduces and of the custom autograd functions in pipeline.parallel.losses."""
    y = dense_targets(indptr, indices, z.shape[1]).to(dtype=z.dtype, device=z.device)
    if kind in ("softmax", "multiclass"):
        per = -(y / y.sum(1, keepdim=True).clamp(min=1) * F.log_softmax(z, 1)).sum(1)
    elif kind == "bce":
        per = F.binary_cross_entropy_with_logits(z, y, reduction="none").sum(1)
    elif kind == "squared_hinge":
        per = F.relu(1 - (2 * y - 1) * z).square().sum(1)
    else:
        raise ValueError(f"no reference for loss {kind!r}")
    return per[valid].sum() / valid.sum().clamp(min=1)


def linear_loss_reference(
    kind: str,
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The `kind` loss (see `reference_loss`) of the logits x W^T + b in float64 over all labels, and its
    gradients.

    x [N, d], w [C, d], b [C] or None (any float dtype; computed in float64); labels as CSR (indptr
    [N + 1], indices) where ids outside [0, C) are ignored; valid [N] bool. Returns (loss, (dx, dW[, db]))
    as float64 tensors, detached. The logits are materialised: independent of the fused chunked op."""
    x, w = x.double().requires_grad_(), w.double().requires_grad_()
    b = b.double().requires_grad_() if b is not None else None
    z = x @ w.T + (b if b is not None else 0)
    known = (indices >= 0) & (indices < w.shape[0])
    rows = torch.repeat_interleave(torch.arange(indptr.numel() - 1), torch.diff(indptr))
    per_row = torch.bincount(rows[known], minlength=x.shape[0])
    sub = torch.cat([torch.zeros(1, dtype=torch.long), per_row.cumsum(0)])
    loss = reference_loss(kind, z, sub, indices[known], valid)
    grads = torch.autograd.grad(loss, [x, w] + ([b] if b is not None else []))
    return loss.detach(), grads


def reference_topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of every row of x [N, C] by (score descending, label id ascending), from a Python sort.

    Returns (scores [N, k] float32, ids [N, k] int64); when k > C the tail is padded with score -inf
    and id -1. Independent of torch.topk and of any merge across ranks."""
    scores, ids = [], []
    for row in x.tolist():
        order = sorted(range(len(row)), key=lambda c, row=row: (-row[c], c))[:k]
        pad = k - len(order)
        scores.append([row[c] for c in order] + [-float("inf")] * pad)
        ids.append(order + [-1] * pad)
    return torch.tensor(scores), torch.tensor(ids)


# ---------------------------------------------------------------- errors


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / (1 + |b|) elementwise (b the reference, same shape as a); 0.0 for empty tensors.
    Reads as an absolute error near zero and a relative one for large |b|."""
    return float(((a - b).abs() / (1 + b.abs())).max()) if a.numel() else 0.0


def rel_err_to_scale(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest deviation relative to the largest reference magnitude, in float64 (inf on NaN or shape
    mismatch). Tensors may be on any device, of any float dtype."""
    if got.shape != ref.shape:
        return math.inf
    diff = (got.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
    if math.isnan(diff):
        return math.inf
    return diff / max(ref.abs().max().item() if ref.numel() else 0.0, 1e-30)


# ---------------------------------------------------------------- the fixed fan-in sparse layer
#
# The layer: y = x @ D^T + b, where D [C, H] is zero except D[c, indices[c, j]] = values[c, j]
# (values, indices [C, K]; indices distinct within a row). The gradient of the weight is dL/dD
# gathered at the indices.


def ffi_dense_reference(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor, dy: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward, dx, dW, db of y = x @ D^T + b in float64 with D the scattered dense weight.

    x [N, H], values [C, K], indices [C, K] (any integer dtype), bias [C], dy [N, C] (any float dtype).
    Returns y [N, C], dx [N, H], dW [C, K], db [C], float64, on x's device. Builds the dense [C, H]
    matrix: independent of the kernels' gather/scatter formulation, for small shapes."""
    x, values, bias, dy = (t.double() for t in (x, values, bias, dy))
    dense = torch.zeros(values.shape[0], x.shape[1], dtype=torch.float64, device=x.device)
    dense.scatter_(1, indices.long(), values)
    y = x @ dense.t() + bias
    dx = dy @ dense
    d_dense = dy.t() @ x
    return y, dx, d_dense.gather(1, indices.long()), dy.sum(0)


def ffi_group_to_dense(
    values: torch.Tensor, indices: torch.Tensor, group_size: int, in_features: int
) -> torch.Tensor:
    """The dense weight D [C, H] of a group-shared FFI layer: D[c, indices[c // G, k]] = values[c, k],
    zero elsewhere, from values [C, K] (any float dtype, kept; any device) and indices [ceil(C / G), K]
    (any integer dtype, distinct within a row). Label by label from the definition, memory C * H: the
    reference of the group ops for small shapes (y = x @ D^T + b, dx = dy @ D, dW = (dy^T x) at the
    label's indices)."""
    num_labels = values.shape[0]
    dense = torch.zeros(num_labels, in_features, dtype=values.dtype, device=values.device)
    groups = torch.arange(num_labels, device=values.device) // group_size
    rows = indices.to(device=values.device, dtype=torch.long)[groups]  # [C, K]: each label's group row
    dense[torch.arange(num_labels, device=values.device)[:, None], rows] = values
    return dense


def ffi_forward_chunked(
    x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, b: torch.Tensor | None, chunk: int = 1024
) -> torch.Tensor:
    """y [N, C] float64 = sum_j x[:, idx[c, j]] * w[c, j] (+ b), from x [N, H], w [C, K], idx [C, K],
    b [C] or None. Gathers `chunk` outputs at a time (peak memory N * chunk * K doubles), so it fits on
    a GPU at 670K labels and H = 65,536 where the dense [C, H] weight would not."""
    x, w = x.double(), w.double()
    out = torch.empty(x.shape[0], w.shape[0], dtype=torch.float64, device=x.device)
    for c0 in range(0, w.shape[0], chunk):
        i = idx[c0 : c0 + chunk].long()
        out[:, c0 : c0 + chunk] = (x[:, i] * w[c0 : c0 + chunk]).sum(-1)
    return out if b is None else out + b.double()


def ffi_backward_input_chunked(
    dy: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, h: int, chunk: int = 1024
) -> torch.Tensor:
    """dx [N, h] float64 = dy @ D: every dy[:, c] * w[c, j] added into column idx[c, j], `chunk`
    outputs at a time (index_add_ in float64), from dy [N, C], w [C, K], idx [C, K]."""
    dy, w = dy.double(), w.double()
    dx = torch.zeros(dy.shape[0], h, dtype=torch.float64, device=dy.device)
    for c0 in range(0, w.shape[0], chunk):
        i = idx[c0 : c0 + chunk].long().reshape(-1)
        contrib = (dy[:, c0 : c0 + chunk, None] * w[c0 : c0 + chunk]).reshape(dy.shape[0], -1)
        dx.index_add_(1, i, contrib)
    return dx


def ffi_backward_weight_chunked(
    dy: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """dW [C, K] float64 = sum over samples of dy[:, c] * x[:, idx[c, j]], `chunk` outputs at a time,
    from dy [N, C], x [N, H], idx [C, K]."""
    dy, x = dy.double(), x.double()
    dw = torch.empty(idx.shape, dtype=torch.float64, device=dy.device)
    for c0 in range(0, idx.shape[0], chunk):
        i = idx[c0 : c0 + chunk].long()
        dw[c0 : c0 + chunk] = (dy[:, c0 : c0 + chunk, None] * x[:, i]).sum(0)
    return dw
