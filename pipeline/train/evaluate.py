"""Top-k prediction and evaluation, shared by the trainer and `launch/predict.py`.

Each rank scores the group batch (`pipeline.models.group_batch`) for its label range, and the
distributed top-k gives every rank of the group the same global top-k for the whole group batch, of
which each rank keeps the rows of its own samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from pipeline.models.group_batch import group_batch
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.topk import distributed_topk
from pipeline.train.metrics import XMCMetrics


@torch.no_grad()
def predict(
    backbone: nn.Module,
    head: nn.Module,
    batches: Iterable,
    grid: ProcessGrid,
    label_range: LabelRange,
    batch_size: int,
    k: int,
) -> Iterator[tuple[object, torch.Tensor, torch.Tensor]]:
    """(batch, top-k scores, top-k global label ids) for this rank's own samples, batch by batch; the
    scores and ids on the CPU, like the batch. `head` is a `Head`."""
    own = slice(grid.mp_rank * batch_size, (grid.mp_rank + 1) * batch_size)
    for batch in batches:
        logits = head(group_batch(backbone, batch, grid, batch_size, with_labels=False).embeddings)
        scores, ids = distributed_topk(logits, k, label_range, grid.mp_group)
        if head.label_order is not None:  # the head scores labels in its own order
            ids = head.label_order.labels(ids)
        yield batch, scores[own][: batch.size].cpu(), ids[own][: batch.size].cpu()


def evaluate(
    backbone: nn.Module,
    head: nn.Module,
    batches: Iterable,
    grid: ProcessGrid,
    label_range: LabelRange,
    batch_size: int,
    metrics: XMCMetrics,
) -> dict[str, float]:
    """The full metric set over all ranks' batches (exact: sums all-reduced over the world)."""
    was_training = backbone.training, head.training
    backbone.eval()
    head.eval()
    for batch, _, ids in predict(backbone, head, batches, grid, label_range, batch_size, max(metrics.ks)):
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
