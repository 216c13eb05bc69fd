"""Top-k prediction and evaluation, shared by the trainer and `launch/predict.py`.

Each rank scores the group batch (`pipeline.models.group_batch`) for its label range, and the
distributed top-k gives every rank of the group the same global top-k for the whole group batch, of
which each rank keeps the rows of its own samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pipeline.data import Batch
from pipeline.models.group_batch import group_batch
from pipeline.models.label_clusters import LabelOrder
from pipeline.models.neighbours import NeighbourVotes
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.topk import distributed_topk
from pipeline.train.metrics import XMCMetrics


@dataclass
class Member:
    """One trained model as prediction uses it: the backbone, the head (a `Head`) for this rank's label
    range and, optionally, the neighbour votes added to the head's logits."""

    backbone: nn.Module
    head: nn.Module
    neighbours: NeighbourVotes | None = None

    def scores(
        self, batch: Batch, grid: ProcessGrid, label_range: LabelRange, batch_size: int
    ) -> torch.Tensor:
        """[group batch, label_range.size] scores of the model-parallel group's batch, in the head's order."""
        embeddings = group_batch(self.backbone, batch, grid, batch_size, with_labels=False).embeddings
        logits = self.head(embeddings)
        if self.neighbours is None:
            return logits
        return logits.float() + self.neighbours.scores(embeddings, label_range, self.head.label_order)


def shared_label_order(members: Sequence[Member]) -> LabelOrder | None:
    """The label order every member's head scores in (None: label id order); ValueError when their
    orders differ, since their scores of one position would be of different labels."""
    orders = [m.head.label_order for m in members]
    first = orders[0]
    for order in orders[1:]:
        same = (order is None and first is None) or (
            order is not None and first is not None and torch.equal(order.order, first.order)
        )
        if not same:
            raise ValueError("ensemble members whose heads order the labels differently cannot be summed")
    return first


@torch.no_grad()
def predict(
    members: Sequence[Member],
    batches: Iterable,
    grid: ProcessGrid,
    label_range: LabelRange,
    batch_size: int,
    k: int,
) -> Iterator[tuple[object, torch.Tensor, torch.Tensor]]:
    """(batch, top-k scores, top-k global label ids) for this rank's own samples, batch by batch; the
    scores and ids on the CPU, like the batch. Several members (an ensemble of independently trained
    models over the same labels) score the sum of their scores."""
    order = shared_label_order(members)
    own = slice(grid.mp_rank * batch_size, (grid.mp_rank + 1) * batch_size)
    for batch in batches:
        logits = members[0].scores(batch, grid, label_range, batch_size)
        for member in members[1:]:
            logits = logits.float() + member.scores(batch, grid, label_range, batch_size)
        scores, ids = distributed_topk(logits, k, label_range, grid.mp_group)
        if order is not None:  # the heads score labels in their own order
            ids = order.labels(ids)
        yield batch, scores[own][: batch.size].cpu(), ids[own][: batch.size].cpu()


def evaluate(
    backbone: nn.Module,
    head: nn.Module,
    batches: Iterable,
    grid: ProcessGrid,
    label_range: LabelRange,
    batch_size: int,
    metrics: XMCMetrics,
    neighbours: NeighbourVotes | None = None,
) -> dict[str, float]:
    """The full metric set over all ranks' batches (exact: sums all-reduced over the world)."""
    was_training = backbone.training, head.training
    backbone.eval()
    head.eval()
    members = [Member(backbone, head, neighbours)]
    for batch, _, ids in predict(members, batches, grid, label_range, batch_size, max(metrics.ks)):
        metrics.update(ids, batch.label_indptr, batch.label_indices, batch.valid)
    backbone.train(was_training[0])
    head.train(was_training[1])
    return metrics.compute(group=dist.group.WORLD)


def popularity(batches: Iterable, metrics: XMCMetrics, label_frequencies) -> dict[str, float]:
    """Metrics of predicting the most frequent training labels (ties: smaller id) for every sample."""
    kmax = max(metrics.ks)
    top = torch.as_tensor(label_frequencies).argsort(descending=True, stable=True)[:kmax]
    top = torch.nn.functional.pad(top, (0, kmax - top.numel()), value=-1)
    for batch in batches:
        metrics.update(top.expand(batch.size, -1), batch.label_indptr, batch.label_indices, batch.valid)
    return metrics.compute(group=dist.group.WORLD)
