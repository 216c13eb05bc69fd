"""The dense output layer: a linear classifier over this rank's label range.

Initialisation does not depend on the split: labels are grouped in fixed blocks of INIT_BLOCK; block b
draws its weight rows and then its biases from a generator seeded with (seed, b), and a shard keeps
the rows of its range. The heads of any model-parallel size hold the same full classifier, so a
single-process reference and resharding a checkpoint need no extra bookkeeping. The distribution is
nn.Linear's: uniform(-1/sqrt(in_features), 1/sqrt(in_features)) for weights and biases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.parallel.label_range import LabelRange

INIT_BLOCK = 4096


def _block_generator(seed: int, block: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * (1 << 24) + block) % (1 << 63))


class DenseHead(nn.Module):
    """Logits [N, label_range.size] = embeddings [N, in_features] @ W_local^T + b_local."""

    def __init__(self, in_features: int, label_range: LabelRange, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.in_features, self.label_range, self.seed = in_features, label_range, seed
        self.weight = nn.Parameter(torch.empty(label_range.size, in_features))
        self.bias = nn.Parameter(torch.empty(label_range.size)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the local rows from the per-block generators (skipped on the meta device)."""
        if self.weight.is_meta:
            return
        bound = 1 / math.sqrt(self.in_features)
        start, stop = self.label_range.start, self.label_range.stop
        for block in range(start // INIT_BLOCK, (stop + INIT_BLOCK - 1) // INIT_BLOCK):
            gen = _block_generator(self.seed, block)
            lo = block * INIT_BLOCK
            weight = torch.empty(INIT_BLOCK, self.in_features).uniform_(-bound, bound, generator=gen)
            bias = torch.empty(INIT_BLOCK).uniform_(-bound, bound, generator=gen)
            a, b = max(start, lo), min(stop, lo + INIT_BLOCK)
            self.weight[a - start : b - start] = weight[a - lo : b - lo]
            if self.bias is not None:
                self.bias[a - start : b - start] = bias[a - lo : b - lo]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(embeddings, self.weight, self.bias)

    def linear_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """x with logits = x W^T + b (here the embeddings): lets the softmax loss fuse the product."""
        return embeddings

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank of the model-parallel group holds whole: none."""
        return []

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters split by label range: all of them."""
        return list(self.parameters())
