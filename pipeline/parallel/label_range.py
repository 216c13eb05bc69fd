"""Which labels a model-parallel rank owns: a contiguous range, sizes differing by at most one."""

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


def split_labels(num_labels: int, mp_size: int, mp_rank: int) -> LabelRange:
    """The mp_rank-th of mp_size contiguous ranges over num_labels; the first num_labels % mp_size
    ranges hold one label more. A rank may own no label at all when num_labels < mp_size."""
    if not 0 <= mp_rank < mp_size:
        raise ValueError(f"mp_rank {mp_rank} outside 0..{mp_size - 1}")
    base, extra = divmod(num_labels, mp_size)
    start = mp_rank * base + min(mp_rank, extra)
    return LabelRange(start, start + base + (mp_rank < extra), num_labels)
