"""The fixed fan-in (FFI) sparse layer: every output reads exactly K of the inputs.

`y[n, c] = b[c] + sum_k W[c, k] * x[n, I[c, k]]` with values `W [C, K]` (trained), indices `I [C, K]`
(int32, distinct within a row; changed only by rewiring) and bias `b [C]`. Uniform fan-in makes the
work per output regular, which is why the kernels behind `torch.ops.xmc` (csrc/) are fast; there is
deliberately no plain-PyTorch fallback here (it lives in the tests and the benchmark).
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


class _FixedFanInFunction(torch.autograd.Function):
    """Autograd over torch.ops.xmc: ffi_forward, then one ffi_backward for the gradients of x and values
    that are needed (on CUDA with both: one fused pass over dy and the connections); the bias gradient
    is a column sum."""

    @staticmethod
    def forward(ctx, x, values, indices, bias):
        ctx.save_for_backward(x, values, indices)
        ctx.has_bias = bias is not None
        return torch.ops.xmc.ffi_forward(x, values, indices, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        x, values, indices = ctx.saved_tensors
        need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_x = grad_values = grad_bias = None
        if need_x or need_values:
            # A gradient not asked for comes back undefined (None).
            grad_x, grad_values = torch.ops.xmc.ffi_backward(grad_y, x, values, indices, need_x, need_values)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_y.sum(0)
        return grad_x, grad_values, None, grad_bias


def ffi_sparse(
    x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Differentiable FFI product of a batch `x [N, H]`: returns `[N, C]` (gradients for x, values, bias)."""
    load_ops()
    return _FixedFanInFunction.apply(x, values, indices, bias)


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
    rows: int, in_features: int, fan_in: int, seed: int | None, first_row: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices, values, bias of rows [first_row, first_row + rows) of a seeded layer.

    Seeded layers draw per block of rows (`pipeline.parallel.block_init`), so a row's initial state does
    not depend on how the outputs are split into shards.
    """
    bound = 1.0 / math.sqrt(fan_in)
    if seed is None:
        indices = draw_fan_in_indices(rows, in_features, fan_in)
        values = torch.rand(rows, fan_in) * (2 * bound) - bound
        return indices, values, torch.rand(rows) * (2 * bound) - bound

    def draw(gen: torch.Generator, n: int) -> tuple[torch.Tensor, ...]:
        indices = draw_fan_in_indices(n, in_features, fan_in, gen)
        return indices, uniform(gen, (n, fan_in), bound), uniform(gen, (n,), bound)

    return block_rows(LabelRange(first_row, first_row + rows, first_row + rows), seed, INIT_STREAM, draw)


class FixedFanInSparse(nn.Module):
    """Linear layer with exactly `fan_in` inputs per output, drawn without replacement.

    Parameters `values [C, K]` and `bias [C]`, buffer `indices [C, K]` int32: all three are in the
    state_dict. Initialised like nn.Linear with fan-in K (uniform in +-1/sqrt(K)), so the output scale
    does not depend on in_features. `seed` makes indices and initial values reproducible (private
    generators; the global RNG is used when it is None). With a seed, the layer holds rows
    [first_row, first_row + out_features) of the layer that seed gives any larger out_features: a shard
    of a label range starts exactly like the same rows of the whole layer. Inputs may have leading
    batch dimensions.
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
    ) -> None:
        super().__init__()
        if not 1 <= fan_in <= in_features:
            raise ValueError(f"fan_in must be in 1..in_features={in_features}, got {fan_in}")
        if out_features < 0 or first_row < 0:
            raise ValueError(f"out_features and first_row must be >= 0, got {out_features}, {first_row}")
        self.in_features, self.out_features, self.fan_in = in_features, out_features, fan_in
        indices, values, b = _initial_rows(out_features, in_features, fan_in, seed, first_row)
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
        y = ffi_sparse(flat, self.values, self.indices, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The equivalent dense weight [C, H] (zeros off the connections); memory C*H, for checks."""
        dense = torch.zeros(
            self.out_features, self.in_features, dtype=self.values.dtype, device=self.values.device
        )
        return dense.scatter_(1, self.indices.long(), self.values.detach())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
            f"bias={self.bias is not None}"
        )
