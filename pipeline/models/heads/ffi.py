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
from pipeline.models.label_clusters import LabelOrder
from pipeline.ops.ffi_sparse import FixedFanInSparse, ffi_sparse
from pipeline.ops.rewiring import rewire
from pipeline.parallel.label_range import LabelRange


class FFIHead(nn.Module):
    """Local logits [N, label_range.size] from embeddings [N, in_features]."""

    preferred_loss = "bce"  # Debian set: the squared hinge trains this head far worse (P@1 72 against 85)

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
        group_size: int = 1,
        clustered: bool = False,
    ) -> None:
        super().__init__()
        self.label_range, self.seed = label_range, seed
        self.rewire_every, self.rewire_fraction = rewire_every, rewire_fraction
        self.dropout = nn.Dropout(dropout)
        self.intermediate = nn.Linear(in_features, hidden)
        self.sparse = FixedFanInSparse(
            hidden, label_range.size, fan_in, seed=seed, first_row=label_range.start, group_size=group_size
        )
        # Clustered groups: the labels in an order whose runs of G are clusters (set by the trainer
        # from the training set, `pipeline.models.label_clusters`; kept in the state_dict, replicated).
        if clustered:
            self.register_buffer("order", torch.arange(label_range.num_labels))
        self._label_order: tuple[int, LabelOrder] | None = None
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
            group_size=f.group_size,
            clustered=f.grouping == "cluster" and f.group_size > 1,
        )

    @torch.no_grad()
    def _init_intermediate(self, generator: torch.Generator) -> None:
        """nn.Linear's distribution (uniform +-1/sqrt(in_features)) from a private generator, so every
        rank of the model-parallel group starts from the same replicated weights."""
        bound = 1.0 / math.sqrt(self.intermediate.in_features)
        self.intermediate.weight.uniform_(-bound, bound, generator=generator)
        self.intermediate.bias.uniform_(-bound, bound, generator=generator)

    @property
    def label_unit(self) -> int:
        """The sparse layer's group size G."""
        return self.sparse.group_size

    @property
    def label_order(self) -> LabelOrder | None:
        """The clustered label order (None: groups of contiguous label ids)."""
        order = getattr(self, "order", None)
        if order is None:
            return None
        if self._label_order is None or self._label_order[0] != order._version:
            self._label_order = (order._version, LabelOrder(order.cpu()))
        return self._label_order[1]

    @torch.no_grad()
    def set_label_order(self, order: LabelOrder) -> None:
        """Score the labels in `order` (before training starts: the rows are positions)."""
        if getattr(self, "order", None) is None:
            raise ValueError(
                "this FFI head groups contiguous label ids; a label order needs grouping='cluster'"
            )
        self.order.copy_(order.order)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.sparse(self.loss_features(embeddings).to(self.sparse.values.dtype))

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

    def loss_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The sparse layer's input [N, hidden]: relu(intermediate(dropout(embeddings)))."""
        return torch.relu(self.intermediate(self.dropout(embeddings)))

    def chunk_logits(self, features: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits [N, hi - lo] of local labels [lo, hi): the sparse layer on rows lo:hi of its values and
        bias. A group-shared layer (`group_size` G > 1: one row of indices per G labels) takes whole
        groups: lo a multiple of G, hi too unless it is the last label; its index rows are
        [lo // G, ceil(hi / G))."""
        layer = self.sparse
        g = layer.group_size
        if lo % g or (hi % g and hi != layer.out_features):
            raise ValueError(f"labels [{lo}, {hi}) cut a group of {g} labels of the sparse layer")
        values = layer.values[lo:hi].to(features.dtype)
        bias = None if layer.bias is None else layer.bias[lo:hi].to(features.dtype)
        indices = layer.indices[lo // g : -(-hi // g)]
        return ffi_sparse(features, values, indices, bias, g)
