"""Rewiring of a fixed fan-in layer (dynamic sparse training): weak connections move to new inputs.

Per output row, the round(fraction * K) connections of smallest |weight| get new random input indices
that the row does not hold yet; their weights restart at `init_value` and the optimizer's per-entry
state (Adam's exp_avg / exp_avg_sq, amsgrad's max_exp_avg_sq, SGD's momentum_buffer: every state
tensor shaped like the weights) is zeroed at exactly those entries, so the moments of the old
connection do not steer the new one. Fan-in stays K. Each model-parallel rank rewires its own layer
(its own label range) with its own generator.
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


@torch.no_grad()
def rewire(
    layer: FixedFanInSparse,
    fraction: float,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer | None = None,
    init_value: float = 0.0,
) -> int:
    """Rewire `layer` in place; returns the number of connections rewired (rows * per-row count).

    New indices avoid every index the row held before (the dropped ones included) when in_features
    leaves room for that, else only the kept ones. Ties in |weight| go to the lower position
    (stable sort), so the result is deterministic for a seeded generator. Vectorised over chunks of
    rows; runs on the layer's device (indices are drawn on the generator's device).
    """
    values, indices = layer.values, layer.indices
    rows, fan_in = values.shape
    count = connections_to_rewire(fan_in, fraction)
    if count == 0 or rows == 0:
        return 0
    in_features = layer.in_features
    avoid_dropped = in_features >= fan_in + count
    moments = []
    if optimizer is not None:
        state = optimizer.state.get(values, {})
        moments = [t for t in state.values() if torch.is_tensor(t) and t.shape == values.shape]
    chunk = max(1, _ROW_ELEMENTS // fan_in)
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        w, idx = values[r0:r1], indices[r0:r1]
        weakest = _weakest(w, count)
        if avoid_dropped:
            exclude = idx
        else:
            keep = torch.ones_like(idx, dtype=torch.bool).scatter_(1, weakest, False)
            exclude = idx[keep].view(r1 - r0, fan_in - count)
        fresh = draw_fan_in_indices(r1 - r0, in_features, count, generator, exclude=exclude)
        idx.scatter_(1, weakest, fresh.to(device=idx.device, dtype=idx.dtype))
        w.scatter_(1, weakest, init_value)
        for moment in moments:
            moment[r0:r1].scatter_(1, weakest.to(moment.device), 0.0)
    return rows * count
