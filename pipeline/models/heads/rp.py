"""The random-projection (RP) head: a slim classifier trained on randomly projected embeddings.

Yuan et al., "Accelerating Deep Learning with Millions of Classes", ECCV 2020: a fixed Gaussian
R (d x k, entries N(0, 1/k)) maps the embedding h to z = R^T h, and the slim classifier V (C x k, this
rank's label range) scores z. Output-layer compute, memory and gradient traffic drop by d / k. The full
classifier is recovered afterwards (`pipeline.models.recovery`).

R is never trained and never stored: it is regenerated from the seed, which is the one thing of it
that goes into the state_dict. Both R and the initial V come from CPU generators in float64, so every
rank, device and run gets bit-identical values, and V's rows do not depend on how the labels are split.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.parallel.label_range import LabelRange

INIT_BLOCK = 4096  # V is initialised per block of this many labels, each block from its own generator
_MASK64 = (1 << 64) - 1


def _mix(seed: int, stream: int) -> int:
    """A 63-bit generator seed for (seed, stream) (splitmix64 finaliser): distinct streams, no overlap."""
    x = (seed * 0x9E3779B97F4A7C15 + stream + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def projection_matrix(in_features: int, dim: int, seed: int) -> torch.Tensor:
    """R (in_features x dim) with entries N(0, 1/dim), a function of (in_features, dim, seed) only.

    Drawn in float64 on a CPU generator (the float32 CPU sampler takes a vectorised path whose rounding
    depends on the instruction set) and then rounded to float32.
    """
    gen = torch.Generator(device="cpu").manual_seed(_mix(seed, 0))
    r = torch.randn(in_features, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    return r.float()


def slim_init(label_range: LabelRange, dim: int, seed: int) -> torch.Tensor:
    """Initial rows of V for label_range: U(-1/sqrt(dim), 1/sqrt(dim)) like nn.Linear, drawn per block
    of INIT_BLOCK global labels, so any split of the labels yields the same rows."""
    bound = 1.0 / math.sqrt(dim)
    rows = []
    if label_range.size:
        for block in range(label_range.start // INIT_BLOCK, (label_range.stop - 1) // INIT_BLOCK + 1):
            gen = torch.Generator(device="cpu").manual_seed(_mix(seed, 1 + block))
            values = torch.rand(INIT_BLOCK, dim, generator=gen, dtype=torch.float64) * (2 * bound) - bound
            lo = max(label_range.start - block * INIT_BLOCK, 0)
            hi = min(label_range.stop - block * INIT_BLOCK, INIT_BLOCK)
            rows.append(values[lo:hi])
    return torch.cat(rows).float() if rows else torch.empty(0, dim)


class RPHead(nn.Module):
    """Logits (h R) V^T + b for the labels of `label_range`.

    `weight` is the slim classifier V [label_range.size, dim], `bias` b [label_range.size]; both are
    sharded by label range. The buffer `seed` (int64, persistent) determines R; `projection` (R) is a
    non-persistent buffer, regenerated on construction and whenever a state_dict brings another seed.
    """

    def __init__(
        self, in_features: int, label_range: LabelRange, dim: int, seed: int, bias: bool = True
    ) -> None:
        super().__init__()
        self.in_features, self.dim, self.label_range = in_features, dim, label_range
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("projection", projection_matrix(in_features, dim, seed), persistent=False)
        self._projection_seed = seed
        self.weight = nn.Parameter(slim_init(label_range, dim, seed))
        self.bias = nn.Parameter(torch.zeros(label_range.size)) if bias else None

    @property
    def R(self) -> torch.Tensor:  # noqa: N802 (the paper's name)
        """The fixed projection R [in_features, dim]."""
        return self.projection

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h R first: N*d*k + N*k*C multiply-adds, against d*k*C + N*d*C for h (R V^T). The bias is
        # added in place after the product: on CPU, addmm with a broadcast bias (what F.linear does)
        # took 3x the time of the plain product at k = 64, C = 200,000 (see launch/bench_rp.py).
        logits = self.linear_input(h) @ self.weight.t()
        return logits if self.bias is None else logits.add_(self.bias)

    def linear_input(self, h: torch.Tensor) -> torch.Tensor:
        """z = h R, with logits = z V^T + b: lets the softmax loss fuse the product."""
        return h.to(self.projection.dtype) @ self.projection

    def replicated_parameters(self) -> list[nn.Parameter]:
        return []

    def sharded_parameters(self) -> list[nn.Parameter]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        seed = int(self.seed)
        if seed != self._projection_seed:
            r = projection_matrix(self.in_features, self.dim, seed)
            self.projection = r.to(device=self.projection.device, dtype=self.projection.dtype)
            self._projection_seed = seed

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, dim={self.dim}, labels=[{self.label_range.start}, "
            f"{self.label_range.stop}), seed={int(self.seed)}, bias={self.bias is not None}"
        )
