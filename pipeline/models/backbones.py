"""Backbones: what turns a sample's features into the d-dimensional embedding the output layer scores.

Both run inside the DeepSpeed engine, replicated on every rank (ZeRO partitions their optimizer
state, gradients or parameters by stage). With `model.sparse_bag` the bag-of-words table leaves the
engine (`BowBackbone.use_external_bag`, `pipeline.models.sparse_bag`); the rest stays in it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

BagFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(indices [nnz], offsets [B], per-sample weights [nnz]) -> bag sums [B, width]."""


def mlp(dims: list[int], dropout: float = 0.0) -> nn.Sequential:
    """Linear layers between consecutive widths, ReLU (then dropout, when > 0) between them (none after
    the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if i:
            layers += [nn.ReLU(), nn.Dropout(dropout)] if dropout else [nn.ReLU()]
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


class BowBackbone(nn.Module):
    """Sparse bag of words: EmbeddingBag over feature ids weighted by tf-idf, then an MLP to embed_dim.

    The EmbeddingBag is the first (and by far the largest) layer; it never materialises the
    num_features-wide input. `dropout` follows every hidden ReLU (on tf-idf data with ~50k samples a
    1024-wide bag overfits without it).

    State dict keys: `bag.weight` [num_features, width], `bag_bias`, `mlp.*` (also when the bag is
    external: the checkpoint merges the external table back in under `bag.weight`).
    """

    def __init__(
        self, num_features: int, embed_dim: int, hidden_dims: list[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        widths = [*hidden_dims, embed_dim]
        self.bag = nn.EmbeddingBag(num_features, widths[0], mode="sum")
        self.bag_bias = nn.Parameter(torch.zeros(widths[0]))
        nn.init.normal_(self.bag.weight, std=widths[0] ** -0.5)
        self.mlp = mlp(widths, dropout) if len(widths) > 1 else nn.Identity()
        hidden = [nn.ReLU(), nn.Dropout(dropout)] if dropout else [nn.ReLU()]
        self.hidden = nn.Sequential(*hidden) if len(widths) > 1 else nn.Identity()

    def forward(self, indices: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        h = self.bag(indices, offsets, per_sample_weights=weights) + self.bag_bias
        return self.mlp(self.hidden(h))

    def use_external_bag(self, bag: BagFn) -> None:
        """Compute the bag sums [B, width] with `bag(indices, offsets, weights)` from now on; the own
        EmbeddingBag is removed. `bag` is held as a plain attribute, not a submodule: its table is no
        parameter, buffer or state_dict entry of this module, so a DeepSpeed engine over this module
        neither reduces, steps, casts, partitions nor saves it (its owner does: `SparseBag`). The MLP
        and `bag_bias` stay, so the engine keeps parameters."""
        del self.bag
        self.__dict__["bag"] = bag


class DenseBackbone(nn.Module):
    """Dense features (e.g. precomputed text embeddings): an MLP, or, when no layer is asked for and
    the widths already agree, the features times one learned scale (the logits' temperature). The
    scale keeps a parameter in the DeepSpeed engine, so precomputed embeddings take the same path."""

    def __init__(self, in_dim: int, embed_dim: int, hidden_dims: list[int]) -> None:
        super().__init__()
        widths = [in_dim, *hidden_dims, embed_dim]
        identity = widths == [in_dim, in_dim]
        self.mlp = nn.Identity() if identity else mlp(widths)
        self.scale = nn.Parameter(torch.ones(1)) if identity else None  # 1-d: ZeRO flattens params

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.mlp(features)
        return h * self.scale if self.scale is not None else h
