"""What the trainer, the checkpoints and the losses need of an output layer, whatever its kind.

A head is an nn.Module holding this rank's share of the output layer: it maps the model-parallel
group's gathered embeddings [N, d] to logits [N, label_range.size] for its label range. Its
parameters are either sharded by label range (one row per local label) or replicated over the group
(whole on every rank; the trainer sums their gradients over the group). Heads whose logits are a
linear product `linear_input(h) @ weight.T + bias` also implement `LinearHead`, which lets the
softmax loss fuse the product with the loss (`pipeline.models.heads.loss`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from pipeline.parallel.label_range import LabelRange


@runtime_checkable
class Head(Protocol):
    label_range: LabelRange

    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [N, label_range.size] from embeddings [N, d]."""
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
