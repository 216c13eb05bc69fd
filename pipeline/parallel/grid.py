"""The dp x mp process grid.

world = dp x mp. Ranks g*mp .. g*mp+mp-1 form model-parallel group g (they split the label range of
the output layer between them); ranks at the same position p in their model-parallel groups form
data-parallel group p (they hold replicas of the same label range and average its gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class GridError(ValueError):
    """The requested model-parallel size does not fit the world."""


@dataclass(frozen=True)
class Layout:
    """Pure arithmetic of the grid, usable without a process group (tests, planning)."""

    world_size: int
    mp: int

    def __post_init__(self) -> None:
        if self.mp < 1 or self.world_size % self.mp:
            raise GridError(
                f"parallel.model_parallel={self.mp} must be >= 1 and divide the world size {self.world_size}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // self.mp

    def mp_rank(self, rank: int) -> int:
        return rank % self.mp

    def dp_rank(self, rank: int) -> int:
        return rank // self.mp

    def mp_group_ranks(self, group: int) -> list[int]:
        return list(range(group * self.mp, (group + 1) * self.mp))

    def dp_group_ranks(self, position: int) -> list[int]:
        return list(range(position, self.world_size, self.mp))


@dataclass(frozen=True)
class ProcessGrid:
    """This rank's place in the grid and the process groups it belongs to."""

    layout: Layout
    rank: int
    mp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def mp(self) -> int:
        return self.layout.mp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def mp_rank(self) -> int:
        return self.layout.mp_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)


def build_grid(model_parallel: int) -> ProcessGrid:
    """Create the model- and data-parallel groups; every rank must call this (new_group is collective)."""
    layout = Layout(dist.get_world_size(), model_parallel)
    rank = dist.get_rank()
    mp_group = dp_group = None
    for g in range(layout.dp):
        group = dist.new_group(layout.mp_group_ranks(g))
        if layout.dp_rank(rank) == g:
            mp_group = group
    for p in range(layout.mp):
        group = dist.new_group(layout.dp_group_ranks(p))
        if layout.mp_rank(rank) == p:
            dp_group = group
    return ProcessGrid(layout, rank, mp_group, dp_group)
