"""Which labels a model-parallel rank owns: a contiguous range, sizes differing by at most one unit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LabelRange:
    """Labels [start, stop) of the num_labels in total that one model-parallel rank scores."""

    start: int
    stop: int
    num_labels: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split_labels(num_labels: int, mp_size: int, mp_rank: int, unit: int = 1) -> LabelRange:
    """The mp_rank-th of mp_size contiguous ranges over num_labels, cut at multiples of `unit` (labels
    that must stay on one rank, e.g. a group of the group-shared FFI layer): the ceil(num_labels / unit)
    units are split so that the first ones hold one unit more, and the last range ends at num_labels.
    A rank may own no label at all when there are fewer units than ranks."""
    if not 0 <= mp_rank < mp_size:
        raise ValueError(f"mp_rank {mp_rank} outside 0..{mp_size - 1}")
    if unit < 1:
        raise ValueError(f"unit must be >= 1, got {unit}")
    base, extra = divmod(-(-num_labels // unit), mp_size)
    first = mp_rank * base + min(mp_rank, extra)
    start = min(first * unit, num_labels)
    return LabelRange(start, min((first + base + (mp_rank < extra)) * unit, num_labels), num_labels)
