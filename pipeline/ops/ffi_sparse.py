"""The fixed fan-in (FFI) sparse layer: every output reads exactly K of the inputs.

`y[n, c] = b[c] + sum_k W[c, k] * x[n, I[c, k]]` with values `W [C, K]` (trained), indices `I [C, K]`
(int32, distinct within a row; changed only by rewiring) and bias `b [C]`. Uniform fan-in makes the
work per output regular, which is why the kernels behind `torch.ops.xmc` (csrc/) are fast; there is
deliberately no plain-PyTorch fallback here (it lives in the tests and the benchmark).

Group-shared fan-in (`group_size` G > 1): labels in groups of G consecutive ids share one index row,
`I [ceil(C / G), K]`, and keep their own weights: `y[n, c] = b[c] + sum_k W[c, k] * x[n, I[c // G, k]]`.
Same 2*N*C*K flops per product, but a group reads each of its K input columns once for its G labels
(a small dense product) instead of once per label.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from pipeline.ops.build import load_ops
from pipeline.parallel.block_init import block_rows, uniform
from pipeline.parallel.label_range import LabelRange

_ELEMENT_BUDGET = 1 << 22  # elements of scratch per chunk of rows when drawing indices
INIT_STREAM = 3  # block_init stream of a seeded layer's initial rows
GROUP_INDEX_STREAM = 4  # block_init stream of a seeded group-shared layer's index rows (one per group)


class _FixedFanInFunction(torch.autograd.Function):
    """Autograd over torch.ops.xmc: one forward, then one backward call for the gradients of x and
    values that are needed (on CUDA with both: one fused pass over dy and the connections); the bias
    gradient is a column sum. G = 1: the plain layer's ops; G > 1: the group-shared ones."""

    @staticmethod
    def forward(ctx, x, values, indices, bias, group_size):
        ctx.save_for_backward(x, values, indices)
        ctx.has_bias, ctx.group_size = bias is not None, group_size
        if group_size == 1:
            return torch.ops.xmc.ffi_forward(x, values, indices, bias)
        return torch.ops.xmc.ffi_group_forward(x, values, indices, bias, group_size)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, values, indices = ctx.saved_tensors
        need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_values = grad_bias = None
        if need_x or need_values:  # a gradient not asked for comes back undefined (None)
            if ctx.group_size == 1:
                grad_x, grad_values = torch.ops.xmc.ffi_backward(
                    grad_y, x, values, indices, need_x, need_values
                )
            else:
                grad_x, grad_values = torch.ops.xmc.ffi_group_backward(
                    grad_y, x, values, indices, ctx.group_size, need_x, need_values
                )
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_values, None, grad_bias, None


def ffi_sparse(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    group_size: int = 1,
) -> torch.Tensor:
    """Differentiable FFI product of a batch `x [N, H]`: returns `[N, C]` (gradients for x, values, bias).

    values `[C, K]`, bias `[C]` or None; indices `[ceil(C / group_size), K]` int32: one row per label
    (group_size 1), or per group of G labels (row q serves labels q*G .. q*G + G - 1). Cost: 2*N*C*K
    flops forward and per gradient.
    """
    load_ops()
    return _FixedFanInFunction.apply(x, values, indices, bias, group_size)


def _duplicates(candidates: torch.Tensor) -> torch.Tensor:
    """True where a row repeats a value already seen earlier in that row."""
    width = candidates.shape[1]
    if width <= 8:  # pairwise is cheaper than a sort for a few columns
        earlier = torch.ones(width, width, dtype=torch.bool, device=candidates.device).tril_(-1)
        return ((candidates[:, :, None] == candidates[:, None, :]) & earlier).any(-1)
    ordered, order = candidates.sort(dim=1, stable=True)
    repeated = torch.zeros_like(candidates, dtype=torch.bool)
    repeated[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    return torch.zeros_like(repeated).scatter_(1, order, repeated)


def _members(candidates: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """True where candidates[r, i] occurs in row r of sets."""
    if candidates.shape[1] <= 8:
        return (candidates[:, :, None] == sets[:, None, :]).any(-1)
    ordered = sets.sort(dim=1).values
    pos = torch.searchsorted(ordered, candidates).clamp_(max=ordered.shape[1] - 1)
    return ordered.gather(1, pos) == candidates


def draw_fan_in_indices(
    rows: int,
    in_features: int,
    count: int,
    generator: torch.Generator | None = None,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per row, `count` distinct indices from [0, in_features) that are not in that row of `exclude`
    ([rows, E], distinct per row). Returns int64 [rows, count] on the generator's device.

    Vectorised and chunked over rows (memory bounded at any row count). Where the free indices are
    plentiful, draws uniformly and redraws only collisions (expected few rounds); where they are scarce
    (in_features < 4 * (count + E)), takes the `count` smallest of random keys over all inputs.
    Deterministic for a seeded generator.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    excluded = 0 if exclude is None else exclude.shape[1]
    if exclude is not None and exclude.shape[0] != rows:
        raise ValueError(f"exclude has {exclude.shape[0]} rows, expected {rows}")
    if count < 0 or count + excluded > in_features:
        raise ValueError(
            f"cannot draw {count} distinct indices from {in_features} inputs with {excluded} excluded per row"
        )
    out = torch.empty(rows, count, dtype=torch.int64, device=device)
    if rows == 0 or count == 0:
        return out
    if exclude is not None:
        exclude = exclude.to(device=device, dtype=torch.int64)
    scarce = in_features < 4 * (count + excluded)
    per_row = in_features if scarce else count + excluded
    chunk = max(1, _ELEMENT_BUDGET // max(per_row, 1))
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        banned = None if exclude is None else exclude[r0:r1]
        if scarce:
            keys = torch.rand(r1 - r0, in_features, generator=generator, device=device)
            if banned is not None:
                keys.scatter_(1, banned, 2.0)  # above every key in [0, 1): never among the smallest
            out[r0:r1] = keys.topk(count, dim=1, largest=False, sorted=False).indices
            continue
        cand = torch.randint(0, in_features, (r1 - r0, count), generator=generator, device=device)
        # Redraw collisions, re-checking only the rows that had one (few after the first round).
        active = torch.arange(r1 - r0, device=device)
        sub, sub_banned = cand, banned
        while True:
            bad = _duplicates(sub)
            if sub_banned is not None and excluded > 0:
                bad |= _members(sub, sub_banned)
            hit = bad.any(dim=1)
            if not bool(hit.any()):
                break
            active, sub, bad = active[hit], sub[hit], bad[hit]
            sub_banned = None if sub_banned is None else sub_banned[hit]
            sub[bad] = torch.randint(0, in_features, (int(bad.sum()),), generator=generator, device=device)
            cand[active] = sub
        out[r0:r1] = cand
    return out


def _initial_rows(
    rows: int, in_features: int, fan_in: int, seed: int | None, first_row: int, group_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices, values, bias of rows [first_row, first_row + rows) of a seeded layer.

    Seeded layers draw per block of rows (`pipeline.parallel.block_init`), so a row's initial state does
    not depend on how the outputs are split into shards. With group_size G > 1 the indices are one row
    per group, drawn per block of groups (GROUP_INDEX_STREAM) over the groups of the range (first_row
    is a multiple of G), and values and bias per block of label rows.
    """
    bound = 1.0 / math.sqrt(fan_in)
    groups = -(-rows // group_size)
    if seed is None:
        indices = draw_fan_in_indices(groups, in_features, fan_in)
        values = torch.rand(rows, fan_in) * (2 * bound) - bound
        return indices, values, torch.rand(rows) * (2 * bound) - bound
    if group_size == 1:

        def draw(gen: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
            indices = draw_fan_in_indices(n, in_features, fan_in, gen)
            return indices, uniform(gen, (n, fan_in), bound), uniform(gen, (n,), bound)

        label_range = LabelRange(first_row, first_row + rows, first_row + rows)
        return block_rows(label_range, seed, INIT_STREAM, draw)

    first_group = first_row // group_size
    (indices,) = block_rows(
        LabelRange(first_group, first_group + groups, first_group + groups),
        seed,
        GROUP_INDEX_STREAM,
        lambda gen, n: (draw_fan_in_indices(n, in_features, fan_in, gen),),
    )
    values, bias = block_rows(
        LabelRange(first_row, first_row + rows, first_row + rows),
        seed,
        INIT_STREAM,
        lambda gen, n: (uniform(gen, (n, fan_in), bound), uniform(gen, (n,), bound)),
    )
    return indices, values, bias


class FixedFanInSparse(nn.Module):
    """Linear layer with exactly `fan_in` inputs per output, drawn without replacement.

    Parameters `values [C, K]` and `bias [C]`, buffer `indices [C, K]` int32: all three are in the
    state_dict. Initialised like nn.Linear with fan-in K (uniform in +-1/sqrt(K)), so the output scale
    does not depend on in_features. `seed` makes indices and initial values reproducible (private
    generators; the global RNG is used when it is None). With a seed, the layer holds rows
    [first_row, first_row + out_features) of the layer that seed gives any larger out_features: a shard
    of a label range starts exactly like the same rows of the whole layer. Inputs may have leading
    batch dimensions.

    Group-shared fan-in (`group_size` G > 1): the outputs come in `groups = ceil(C / G)` groups of G
    consecutive ids (the last may be partial) that share one index row, `indices [groups, K]`; each
    output keeps its own K weights. A shard then starts at a group boundary (`first_row` a multiple of
    G) and its rows equal those of the whole layer for any such split. Cost per fwd+bwd: 6*N*C*K flops
    as for G = 1, with the K input columns of a group read once for its G outputs. G = 1 is the plain
    layer (its own kernels, the same initial state as always).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        bias: bool = True,
        seed: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        first_row: int = 0,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be in 1..in_features={in_features}, got {fan_in}")
        if out_features < 0 or first_row < 0:
            raise ValueError(f"out_features and first_row must be >= 0, got {out_features}, {first_row}")
        if group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {group_size}")
        if first_row % group_size:
            raise ValueError(
                f"first_row {first_row} is not a multiple of group_size {group_size}: "
                "a shard of a group-shared layer holds whole groups"
            )
        self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
        self.group_size = group_size
        self.groups = -(-out_features // group_size)
        indices, values, b = _initial_rows(out_features, in_features, fan_in, seed, first_row, group_size)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("indices", indices.to(device=device, dtype=torch.int32))
        self.values = nn.Parameter(values.to(device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(b.to(device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        flat = x.reshape(-1, self.in_features)
        y = ffi_sparse(flat, self.values, self.indices, self.bias, self.group_size)
        return y.reshape(*x.shape[:-1], self.out_features)

    def state_row_labels(self) -> dict[str, int]:
        """Labels per row of each state tensor: one for values and bias, G for the index rows (what a
        checkpoint's re-cut to another model-parallel split cuts by, `pipeline.models.build`)."""
        return {"values": 1, "bias": 1, "indices": self.group_size}

    def label_indices(self) -> torch.Tensor:
        """Index row of every output, [C, K] int64 (group rows repeated G times); memory C*K."""
        rows = self.indices.long()
        if self.group_size == 1:
            return rows
        return rows.repeat_interleave(self.group_size, dim=0)[: self.out_features]

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight [C, H] (zeros off the connections); memory C*H, for checks."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device
        )
        return dense.scatter_(1, self.label_indices(), self.values.detach())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
