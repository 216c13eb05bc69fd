"""The FFI output layer: dropout -> dense intermediate layer (H, ReLU) -> fixed fan-in sparse layer.

The architecture of Schultheis & Babbar (2023): a wide dense intermediate layer followed by a sparse
layer with exactly `fan_in` connections per label keeps the output layer's memory linear in the
number of labels times K instead of labels times H. Under model parallelism the intermediate layer is
replicated over the group (same initialisation on every rank: it is seeded from `seed` alone, and the
trainer sums its gradients over the group), while the sparse layer holds only this rank's labels:
rows [start, stop) of the layer that `seed` gives all labels (blocks of rows seeded from (seed, block),
see FixedFanInSparse). Ranks differ, a run is reproducible, and any split starts from the same
classifier as a single process, like the dense head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.ops.ffi_sparse import FixedFanInSparse
from pipeline.ops.rewiring import rewire
from pipeline.parallel.label_range import LabelRange


def _mix(seed: int) -> int:
    """The sparse layer's seed: a stream apart from the intermediate layer's."""
    return (seed * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


class FFIHead(nn.Module):
    """Local logits [N, label_range.size] from embeddings [N, in_features]."""

    def __init__(
        self,
        in_features: int,
        label_range: LabelRange,
        hidden: int,
        fan_in: int,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.label_range, self.seed = label_range, seed
        self.dropout = nn.Dropout(dropout)
        self.intermediate = nn.Linear(in_features, hidden)
        self.sparse = FixedFanInSparse(
            hidden, label_range.size, fan_in, seed=_mix(seed), first_row=label_range.start
        )
        self._init_intermediate(torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def _init_intermediate(self, generator: torch.Generator) -> None:
        """nn.Linear's distribution (uniform +-1/sqrt(in_features)) from a private generator, so every
        rank of the model-parallel group starts from the same replicated weights."""
        bound = 1.0 / math.sqrt(self.intermediate.in_features)
        self.intermediate.weight.uniform_(-bound, bound, generator=generator)
        self.intermediate.bias.uniform_(-bound, bound, generator=generator)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.intermediate(self.dropout(embeddings)))
        return self.sparse(hidden)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """The intermediate layer: whole on every rank of the model-parallel group."""
        return list(self.intermediate.parameters())

    def sharded_parameters(self) -> list[nn.Parameter]:
        """The sparse layer: this rank's labels only."""
        return list(self.sparse.parameters())

    def rewire(
        self,
        fraction: float,
        generator: torch.Generator,
        optimizer: torch.optim.Optimizer | None = None,
        init_value: float = 0.0,
    ) -> int:
        """Rewire this rank's sparse layer (see pipeline.ops.rewiring.rewire); returns connections moved."""
        return rewire(self.sparse, fraction, generator, optimizer, init_value)
