"""The dense output layer: a linear classifier over this rank's label range.

Initialisation does not depend on the split (`pipeline.parallel.block_init`): the heads of any
model-parallel size hold the same full classifier. The distribution is nn.Linear's:
uniform(-1/sqrt(in_features), 1/sqrt(in_features)) for weights and biases.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.parallel.block_init import block_rows, uniform
from pipeline.parallel.label_range import LabelRange

INIT_STREAM = 0  # block_init stream of the dense head's weight rows and biases


class DenseHead(nn.Module):
    """Logits [N, label_range.size] = embeddings [N, in_features] @ W_local^T + b_local."""

    label_order = None  # labels in id order
    label_unit = 1  # no state shared between labels
    preferred_loss = "squared_hinge"  # Debian set: above bce on P@1, P@5 and PSP@5 (README)

    def __init__(self, in_features: int, label_range: LabelRange, bias: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.in_features, self.label_range, self.seed = in_features, label_range, seed
        self.weight = nn.Parameter(torch.empty(label_range.size, in_features))
        self.bias = nn.Parameter(torch.empty(label_range.size)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, model: ModelConfig, label_range: LabelRange, seed: int) -> DenseHead:
        return cls(model.embed_dim, label_range, seed=seed)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fill the local rows from the per-block generators (skipped on the meta device)."""
        if self.weight.is_meta:
            return
        bound = 1 / math.sqrt(self.in_features)

        def draw(gen: torch.Generator, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
            return uniform(gen, (rows, self.in_features), bound), uniform(gen, (rows,), bound)

        weight, bias = block_rows(self.label_range, self.seed, INIT_STREAM, draw)
        self.weight.copy_(weight)
        if self.bias is not None:
            self.bias.copy_(bias)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        # A bfloat16 W (model.head_dtype) multiplies bf16 embeddings with float32 accumulation.
        return nn.functional.linear(embeddings.to(self.weight.dtype), self.weight, self.bias)

    def linear_input(self, embeddings: torch.Tensor) -> torch.Tensor:
        """x with logits = x W^T + b (here the embeddings): lets the softmax loss fuse the product."""
        return embeddings

    def loss_features(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The last layer's input: the embeddings themselves."""
        return embeddings

    def chunk_logits(self, features: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Logits [N, hi - lo] = features [N, in_features] @ W[lo:hi]^T + b[lo:hi], in the features'
        dtype (bfloat16 rows are widened, a [hi - lo, in_features] copy)."""
        bias = None if self.bias is None else self.bias[lo:hi].to(features.dtype)
        return nn.functional.linear(features, self.weight[lo:hi].to(features.dtype), bias)

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank of the model-parallel group holds whole: none."""
        return []

    def sharded_parameters(self) -> list[nn.Parameter]:
        """Parameters split by label range: all of them."""
        return list(self.parameters())

    def output_bias(self) -> nn.Parameter | None:
        return self.bias

    def weight_decay(self) -> float:
        return 0.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> None:
        """Nothing changes between steps."""
