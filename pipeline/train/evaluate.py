"""Embedding, top-k prediction and evaluation, shared by the trainer and `launch/predict.py`.

Every rank embeds its own batch; the model-parallel group gathers the embeddings, each rank scores
its label range, and the distributed top-k gives every rank of the group the same global top-k for
the whole group batch, of which each rank keeps the rows of its own samples. Batches are padded to
the full batch size (padding rows are invalid) because the gather needs equal sizes in the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.model_parallel import gather_embeddings
from pipeline.parallel.topk import distributed_topk
from pipeline.train.metrics import XMCMetrics


def embed(backbone: nn.Module, batch, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Backbone embeddings of a batch in float32, padded with zero rows to `batch_size`, on the
    backbone's device."""
    device = next(backbone.parameters()).device
    if batch.dense is not None:
        h = backbone(batch.dense.to(device, dtype))
    else:
        inputs = (batch.feature_indices, batch.feature_offsets, batch.feature_weights.to(dtype))
        h = backbone(*(t.to(device) for t in inputs))
    missing = batch_size - h.shape[0]
    if missing:
        h = torch.cat([h, h.new_zeros(missing, h.shape[1])])
    return h.float()


def padded_labels(batch, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label CSR (indptr, indices) and validity of a batch padded to `batch_size` (empty, invalid rows)."""
    missing = batch_size - batch.size
    indptr, valid = batch.label_indptr, batch.valid
    if missing:
        indptr = torch.cat([indptr, indptr[-1:].expand(missing)])
        valid = torch.cat([valid, torch.zeros(missing, dtype=torch.bool)])
    return indptr, batch.label_indices, valid


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
    scores and ids on the CPU, like the batch."""
    dtype = next(backbone.parameters()).dtype
    own = slice(grid.mp_rank * batch_size, (grid.mp_rank + 1) * batch_size)
    for batch in batches:
        h = embed(backbone, batch, batch_size, dtype)
        logits = head(gather_embeddings(h, grid.mp_group))
        scores, ids = distributed_topk(logits, k, label_range, grid.mp_group)
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
