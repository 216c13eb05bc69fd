"""An order of the labels in which neighbours are alike: the groups of the group-shared FFI layer.

The group-shared fixed fan-in layer (`model.ffi.group_size` G) lets G labels share one set of K inputs.
Labels that respond to the same inputs lose least by sharing, so with `model.ffi.grouping = "cluster"`
the labels are put in an order where each run of G consecutive labels is a cluster, and the model
works in that order ("positions") throughout: a label-range shard holds whole groups, the loss maps
the targets' label ids to positions, predictions map positions back (`LabelOrder`).

The clusters are computed once, from one pass over the training set:
- each label's centroid: the sum of its training samples' features, sketched to `dim` dimensions by a
  fixed Gaussian projection (bag of words: the tf-idf row times a [F, dim] matrix, one EmbeddingBag
  sum; dense features: a product); text shards have no features before the encoder, so a sample is
  sketched by the sum of random vectors of its labels (clusters of co-occurring labels). A label no
  training sample carries keeps a random direction;
- balanced recursive 2-means on the L2-normalised centroids (the hierarchical balanced k-means of
  Parabel / PECOS, with the split sizes rounded to multiples of G): every split cuts a run of labels
  into two by the difference of the two cluster means, the larger side a multiple of G, until runs
  have G labels. Cost: one pass over the data, then about (2C / G) splits of a few small products each.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from pipeline.data.collate import Batch

SKETCH_DIM = 64
SPLIT_ITERATIONS = 8


class LabelOrder:
    """order[p] = the label at position p (a permutation of the C labels) and its inverse."""

    def __init__(self, order: torch.Tensor) -> None:
        order = torch.as_tensor(order, dtype=torch.int64)
        if order.dim() != 1 or not torch.equal(order.sort().values, torch.arange(order.numel())):
            raise ValueError(f"a label order must be a permutation of 0..C-1, got shape {tuple(order.shape)}")
        self.order = order
        self.position = torch.empty_like(order)
        self.position[order] = torch.arange(order.numel())

    def positions(self, label_ids: torch.Tensor) -> torch.Tensor:
        """Positions of label ids (any shape); ids outside [0, C) stay as they are (the loss ignores them)."""
        inside = (label_ids >= 0) & (label_ids < self.order.numel())
        mapped = self.position.to(label_ids.device)[label_ids.clamp(0, max(self.order.numel() - 1, 0))]
        return torch.where(inside, mapped, label_ids)

    def labels(self, positions: torch.Tensor) -> torch.Tensor:
        """Label ids of positions (any shape); -1 (no prediction) stays -1."""
        mapped = self.order.to(positions.device)[positions.clamp(min=0)]
        return torch.where(positions >= 0, mapped, positions)


def _sample_sketches(batch: Batch, features: torch.Tensor | None, labels: torch.Tensor) -> torch.Tensor:
    """[B, dim] sketches of a batch's samples (see the module docstring)."""
    if batch.feature_indices is not None:
        return F.embedding_bag(
            batch.feature_indices,
            features,
            batch.feature_offsets,
            mode="sum",
            per_sample_weights=batch.feature_weights,
        )
    if batch.dense is not None:
        return batch.dense @ features
    offsets = batch.label_indptr[:-1]
    return F.embedding_bag(batch.label_indices, labels, offsets, mode="sum")


@torch.no_grad()
def label_centroids(
    batches: Iterable[Batch], num_labels: int, num_features: int, seed: int, dim: int = SKETCH_DIM
) -> torch.Tensor:
    """L2-normalised sketched centroids [num_labels, dim] of the labels' training samples."""
    gen = torch.Generator().manual_seed(seed)
    label_vectors = torch.randn(num_labels, dim, generator=gen)
    features = None
    centroids = torch.zeros(num_labels, dim)
    for batch in batches:
        if features is None and batch.input_ids is None and batch.texts is None:
            features = torch.randn(num_features, dim, generator=gen)
        sketch = _sample_sketches(batch, features, label_vectors)
        sketch = sketch * batch.valid[:, None]
        rows = torch.repeat_interleave(torch.arange(batch.size), batch.label_indptr.diff())
        centroids.index_add_(0, batch.label_indices, sketch[rows])
    empty = centroids.abs().sum(1) == 0
    centroids[empty] = label_vectors[empty]
    return F.normalize(centroids, dim=1)


def _split(x: torch.Tensor, left: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of the rows of x [n, d] whose first `left` rows form one of two balanced 2-means
    clusters (cosine), the rest the other."""
    n = x.shape[0]
    first, second = torch.randperm(n, generator=gen)[:2].tolist()
    a, b = x[first], x[second]
    order = torch.arange(n)
    for _ in range(SPLIT_ITERATIONS):
        order = (x @ (a - b)).argsort(descending=True, stable=True)
        a = F.normalize(x[order[:left]].sum(0), dim=0)
        b = F.normalize(x[order[left:]].sum(0), dim=0)
    return order


def balanced_order(centroids: torch.Tensor, group_size: int, seed: int) -> LabelOrder:
    """The label order whose consecutive runs of `group_size` are clusters of `centroids` [C, d]
    (balanced recursive 2-means; the last run holds the remainder when G does not divide C)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(centroids.shape[0])
    runs = [(0, centroids.shape[0])]
    while runs:
        longer = []
        for lo, hi in runs:
            n = hi - lo
            if n <= group_size:
                continue
            groups = -(-n // group_size)
            left = -(-groups // 2) * group_size
            ids = order[lo:hi]
            order[lo:hi] = ids[_split(centroids[ids], left, gen)]
            longer += [(lo, lo + left), (lo + left, hi)]
        runs = longer
    return LabelOrder(order)
