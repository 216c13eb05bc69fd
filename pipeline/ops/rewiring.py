"""Rewiring of a fixed fan-in layer (dynamic sparse training): weak connections move to new inputs.

Per output row, the round(fraction * K) connections of smallest |weight| get new random input indices
that the row does not hold yet; their weights restart at `init_value` and the optimizer's per-entry
state (Adam's exp_avg / exp_avg_sq, amsgrad's max_exp_avg_sq, SGD's momentum_buffer: every state
tensor shaped like the weights) is zeroed at exactly those entries, so the moments of the old
connection do not steer the new one. Fan-in stays K. Each model-parallel rank rewires its own layer
(its own label range) with its own generator.

Group-shared layers (group_size G > 1) rewire per group: the round(fraction * K) index positions with
the smallest |W| summed over the group's labels get new inputs the group does not hold yet, and the
weights (and optimizer state) of all the group's labels at those positions restart.
"""

from __future__ import annotations

import torch

from pipeline.ops.ffi_sparse import FixedFanInSparse, draw_fan_in_indices

_ROW_ELEMENTS = 1 << 20  # connections per chunk of rows


def connections_to_rewire(fan_in: int, fraction: float) -> int:
    """round(fraction * fan_in), halves rounded up."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rewire fraction must be in [0, 1], got {fraction}")
    return int(fraction * fan_in + 0.5)


def _weakest(w: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the `count` smallest |w| per row, ties to the lower position."""
    magnitude = w.abs()
    if count > 8:
        return magnitude.argsort(dim=1, stable=True)[:, :count]
    picks = []
    for _ in range(count):  # argmin returns the first minimum: same order as a stable sort, faster
        pick = magnitude.argmin(dim=1, keepdim=True)
        magnitude.scatter_(1, pick, float("inf"))
        picks.append(pick)
    return torch.cat(picks, dim=1)


def _moments(values: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The optimizer's state tensors shaped like the weights (zeroed where connections move)."""
    if optimizer is None:
        return []
    state = optimizer.state.get(values, {})
    return [t for t in state.values() if torch.is_tensor(t) and t.shape == values.shape]


def _fresh_indices(
    idx: torch.Tensor, weakest: torch.Tensor, in_features: int, generator: torch.Generator
) -> torch.Tensor:
    """New indices [rows, count] for the `weakest` positions of the index rows `idx` [rows, K]: none of
    the row's indices (the dropped ones included) when in_features leaves room for that, else none of
    the kept ones."""
    rows, fan_in = idx.shape
    count = weakest.shape[1]
    if in_features >= fan_in + count:
        exclude = idx
    else:
        keep = torch.ones_like(idx, dtype=torch.bool).scatter_(1, weakest, False)
        exclude = idx[keep].view(rows, fan_in - count)
    return draw_fan_in_indices(rows, in_features, count, generator, exclude=exclude)


@torch.no_grad()
def rewire(
    layer: FixedFanInSparse,
    fraction: float,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
    init_value: float = 0.0,
) -> int:
    """Rewire `layer` in place; returns the number of weights restarted (outputs * per-row count).

    New indices avoid every index the row (the group, for G > 1) held before, the dropped ones
    included, when in_features leaves room for that, else only the kept ones. Ties in |weight| (in the
    group's summed |weight|) go to the lower position (stable sort), so the result is deterministic for
    a seeded generator. Vectorised over chunks of rows; runs on the layer's device (indices are drawn
    on the generator's device). Cost: O(C*K) plus the draws.
    """
    if getattr(layer, "group_size", 1) > 1:
        return _rewire_groups(layer, fraction, generator, optimizer, init_value)
    values, indices = layer.values, layer.indices
    rows, fan_in = values.shape
    count = connections_to_rewire(fan_in, fraction)
    if count == 0 or rows == 0:
        return 0
    moments = _moments(values, optimizer)
    chunk = max(1, _ROW_ELEMENTS // fan_in)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        w, idx = values[r0:r1], indices[r0:r1]
        weakest = _weakest(w, count)
        fresh = _fresh_indices(idx, weakest, layer.in_features, generator)
        idx.scatter_(1, weakest, fresh.to(device=idx.device, dtype=idx.dtype))
        w.scatter_(1, weakest, init_value)
        for moment in moments:
            moment[r0:r1].scatter_(1, weakest.to(moment.device), 0.0)
    return rows * count


def _rewire_groups(
    layer: FixedFanInSparse,
    fraction: float,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None,
    init_value: float,
) -> int:
    """rewire() of a group-shared layer: per group, the positions of smallest summed |W| over its labels."""
    values, indices, size = layer.values, layer.indices, layer.group_size
    rows, fan_in = values.shape
    groups = indices.shape[0]
    count = connections_to_rewire(fan_in, fraction)
    if count == 0 or rows == 0:
        return 0
    moments = _moments(values, optimizer)
    chunk = max(1, _ROW_ELEMENTS // (fan_in * size))  # groups per chunk
    for q0 in range(0, groups, chunk):
        q1 = min(groups, q0 + chunk)
        r0, r1 = q0 * size, min(rows, q1 * size)
        w, idx = values[r0:r1], indices[q0:q1]
        # Summed |W| per (group, position), a plain reduction (deterministic on every device); the last
        # group may hold fewer than G labels.
        magnitude = w.detach().abs().to(torch.promote_types(w.dtype, torch.float32))
        missing = (q1 - q0) * size - (r1 - r0)
        if missing:
            magnitude = torch.cat([magnitude, magnitude.new_zeros(missing, fan_in)])
        weakest = _weakest(magnitude.view(q1 - q0, size, fan_in).sum(1), count)
        owner = torch.arange(r1 - r0, device=w.device) // size
        fresh = _fresh_indices(idx, weakest.to(idx.device), layer.in_features, generator)
        idx.scatter_(1, weakest.to(idx.device), fresh.to(device=idx.device, dtype=idx.dtype))
        per_label = weakest.to(w.device).index_select(0, owner)
        w.scatter_(1, per_label, init_value)
        for moment in moments:
            moment[r0:r1].scatter_(1, per_label.to(moment.device), 0.0)
    return rows * count
