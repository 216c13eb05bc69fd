"""What the trainer, the checkpoints and the losses need of an output layer, whatever its kind.

A head is an nn.Module holding this rank's share of the output layer: it maps the model-parallel
group's gathered embeddings [N, d] to logits [N, label_range.size] for its label range. Its
parameters are either sharded by label range (one row per local label) or replicated over the group
(whole on every rank; the trainer sums their gradients over the group). Heads whose logits are a
linear product `linear_input(h) @ weight.T + bias` also implement `LinearHead`, which lets the
softmax loss fuse the product with the loss (`pipeline.models.heads.loss`). Every head splits into
features (`loss_features`) and a last layer evaluated per block of labels (`chunk_logits`), which the
chunked loss (`pipeline.ops.chunked_loss`) runs without the whole logits.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pipeline.models.label_clusters import LabelOrder
from pipeline.parallel.label_range import LabelRange


@runtime_checkable
class Head(Protocol):
    label_range: LabelRange
    label_order: LabelOrder | None
    label_unit: int
    """Labels that share state and stay together: model-parallel shards and loss chunks cut only
    between them (G for a group-shared FFI layer, else 1)."""
    """The order the head scores the labels in (its logits' columns are positions; the loss maps
    target ids to positions, predictions map positions back), or None: label id order."""

    preferred_loss: str
    """The loss kind `model.loss = "auto"` trains this head with (the best measured on real data)."""

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [N, label_range.size] from embeddings [N, d]."""
        ...

    def loss_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The input of the head's last, label-sharded layer [N, k], computed once per step with ordinary
        autograd (the replicated layers before it get their gradients through it)."""
        ...

    def chunk_logits(self, features: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits [N, hi - lo] of local labels [lo, hi) from `loss_features` [N, k], through row slices
        `p[lo:hi]` of the sharded parameters only (the chunked loss takes gradients at those slices).
        Concatenated over a cover of [0, label_range.size) they equal the head's logits."""
        ...

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank of the model-parallel group holds whole."""
        ...

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters split by label range (first dimension = local labels)."""
        ...

    def output_bias(self) -> nn.Parameter | None:
        """The per-label bias [label_range.size] added to the logits last (None: the head has none)."""
        ...

    def weight_decay(self) -> float:
        """The L2 coefficient the head's optimizer applies (Adam's coupled weight decay)."""
        ...

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Called after optimizer step `step` (counted from 1): structural updates such as rewiring,
        drawing from this rank's `generator`."""
        ...


@runtime_checkable
class LinearHead(Head, Protocol):
    weight: nn.Parameter
    bias: nn.Parameter | None

    def linear_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """x with logits = x @ weight.T + bias."""
        ...
