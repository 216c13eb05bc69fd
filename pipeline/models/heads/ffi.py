"""The FFI output layer: dropout -> dense intermediate layer (H, ReLU) -> fixed fan-in sparse layer.

The architecture of Schultheis & Babbar (2023): a wide dense intermediate layer followed by a sparse
layer with exactly `fan_in` connections per label keeps the output layer's memory linear in the
number of labels times K instead of labels times H. Under model parallelism the intermediate layer is
replicated over the group (same initialisation on every rank: it is seeded from `seed` alone, and the
trainer sums its gradients over the group), while the sparse layer holds only this rank's labels:
rows [start, stop) of the layer that `seed` gives all labels (`pipeline.parallel.block_init`). Ranks
differ, a run is reproducible, and any split starts from the same classifier as a single process,
like the dense head. With `rewire_every` > 0 the sparse layer is rewired after every that many
optimizer steps (dynamic sparse training, `pipeline.ops.rewiring`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.ops.ffi_sparse import FixedFanInSparse
from pipeline.ops.rewiring import rewire
from pipeline.parallel.label_range import LabelRange


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
        rewire_every: int = 0,
        rewire_fraction: float = 0.1,
    ) -> None:
        super().__init__()
        self.label_range, self.seed = label_range, seed
        self.rewire_every, self.rewire_fraction = rewire_every, rewire_fraction
        self.dropout = nn.Dropout(dropout)
        self.intermediate = nn.Linear(in_features, hidden)
        self.sparse = FixedFanInSparse(
            hidden, label_range.size, fan_in, seed=seed, first_row=label_range.start
        )
        self._init_intermediate(torch.Generator().manual_seed(seed))

    @classmethod
    def from_config(cls, model: ModelConfig, label_range: LabelRange, seed: int) -> FFIHead:
        f = model.ffi
        return cls(
            model.embed_dim,
            label_range,
            f.hidden,
            f.fan_in,
            f.dropout,
            seed=seed,
            rewire_every=f.rewire_every,
            rewire_fraction=f.rewire_fraction,
        )

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

    def output_bias(self) -> nn.Parameter | None:
        return self.sparse.bias

    def weight_decay(self) -> float:
        return 0.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Rewire every `rewire_every` steps."""
        if self.rewire_every and step % self.rewire_every == 0:
            self.rewire(self.rewire_fraction, generator, optimizer)

    def rewire(
        self,
        fraction: float,
        generator: torch.Generator,
        optimizer: torch.optim.Optimizer | None = None,
        init_value: float = 0.0,
    ) -> int:
        """Rewire this rank's sparse layer (see pipeline.ops.rewiring.rewire); returns connections moved."""
        return rewire(self.sparse, fraction, generator, optimizer, init_value)
