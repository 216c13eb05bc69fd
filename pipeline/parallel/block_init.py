"""Initial values of label-sharded tensors that do not depend on how the labels are split.

Every per-label tensor of a head (weight rows, biases, a sparse layer's connections) is drawn in fixed
blocks of BLOCK global label ids: block b draws from its own CPU generator, seeded with
mix(seed, stream, b), and a shard keeps the rows of its range. A head of any model-parallel size, and a
single process, therefore start from the same full classifier, so single-process references and
resharding need no bookkeeping. `stream` keeps the tensors of different heads (or of one head) apart.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.parallel.label_range import LabelRange

BLOCK = 4096  # labels per independently seeded block
_MASK64 = (1 << 64) - 1


def mix(seed: int, stream: int, block: int = 0) -> int:
    """A 63-bit generator seed for (seed, stream, block): the splitmix64 finaliser over their
    combination, so nearby inputs give unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + block + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def block_rows(
    label_range: LabelRange,
    seed: int,
    stream: int,
    draw: Callable[[torch.Generator, int], tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, ...]:
    """Rows [label_range.start, label_range.stop) of the tensors that `draw(generator, BLOCK)` makes
    per block (each with BLOCK leading rows), concatenated per tensor. Cost: one draw per block the
    range touches (at most two more blocks than the range covers)."""
    start, stop = label_range.start, label_range.stop
    parts = []
    for block in range(start // BLOCK, -(-stop // BLOCK)):
        lo = block * BLOCK
        drawn = draw(torch.Generator().manual_seed(mix(seed, stream, block)), BLOCK)
        parts.append([t[max(start, lo) - lo : min(stop, lo + BLOCK) - lo] for t in drawn])
    if not parts:  # an empty range: the shapes of one block, no rows
        return tuple(t[:0] for t in draw(torch.Generator().manual_seed(mix(seed, stream)), BLOCK))
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def uniform(generator: torch.Generator, shape: tuple[int, ...], bound: float) -> torch.Tensor:
    """U(-bound, bound) in float32 from float64 draws (the float32 CPU sampler's rounding depends on
    the instruction set; float64 then rounding is the same on every machine)."""
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * (2 * bound) - bound).float()
