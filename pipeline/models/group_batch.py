"""The model-parallel group's batch: what every head sees, in training, prediction and recovery.

Every rank embeds its own batch with the backbone; the group all-gathers the embeddings (in
group-rank order) and the labels, so each rank can score the whole group's samples against its own
label range. Batches are padded with zero rows to the full batch size (padding rows are invalid)
because the gathers need equal sizes in the group.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch
from torch import nn

from pipeline.data import Batch
from pipeline.parallel.gather_labels import gather_labels
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.model_parallel import gather_embeddings


class GroupBatch(NamedTuple):
    """embeddings [mp * B, d] float32; the labels as CSR (label_indptr [mp * B + 1], label_indices of
    global ids) and valid [mp * B] bool; identical on every rank of the group."""

    embeddings: torch.Tensor
    label_indptr: torch.Tensor
    label_indices: torch.Tensor
    valid: torch.Tensor


def embed(backbone: nn.Module, batch: Batch, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Backbone embeddings of a batch in float32, padded with zero rows to `batch_size`, on the
    backbone's device; `dtype` is the backbone's parameter dtype (inputs are cast to it)."""
    device = next(backbone.parameters()).device
    if batch.input_ids is not None:
        h = backbone(batch.input_ids.to(device), batch.attention_mask.to(device))
    elif batch.dense is not None:
        h = backbone(batch.dense.to(device, dtype))
    else:
        inputs = (batch.feature_indices, batch.feature_offsets, batch.feature_weights.to(dtype))
        h = backbone(*(t.to(device) for t in inputs))
    missing = batch_size - h.shape[0]
    if missing:
        h = torch.cat([h, h.new_zeros(missing, h.shape[1])])
    return h.float()


def padded_labels(batch: Batch, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label CSR (indptr, indices) and validity of a batch padded to `batch_size` (empty, invalid rows)."""
    missing = batch_size - batch.size
    indptr, valid = batch.label_indptr, batch.valid
    if missing:
        indptr = torch.cat([indptr, indptr[-1:].expand(missing)])
        valid = torch.cat([valid, torch.zeros(missing, dtype=torch.bool)])
    return indptr, batch.label_indices, valid


def group_batch(
    backbone: nn.Module,
    batch: Batch,
    grid: ProcessGrid,
    batch_size: int,
    grad_scale: float = 1.0,
    with_labels: bool = True,
) -> GroupBatch:
    """Embed this rank's batch and gather the group's embeddings and (with_labels) labels onto the
    embeddings' device. Collective over the model-parallel group. `grad_scale` multiplies the
    embeddings' gradient (see `gather_embeddings`; training passes grid.mp). Without labels the CSR
    fields hold this rank's own labels only (prediction scores its own rows against them)."""
    dtype = next(backbone.parameters()).dtype
    h = gather_embeddings(embed(backbone, batch, batch_size, dtype), grid.mp_group, grad_scale)
    labels = [t.to(h.device) for t in padded_labels(batch, batch_size)]
    if with_labels:
        labels = gather_labels(*labels, grid.mp_group)
    return GroupBatch(h, *labels)


def group_batches(
    backbone: nn.Module, batches: Iterable[Batch], grid: ProcessGrid, batch_size: int
) -> Iterator[GroupBatch]:
    """`group_batch` of every batch, without autograd (inference and recovery passes)."""
    for batch in batches:
        with torch.no_grad():  # not around the yield: a caller that stops early would inherit it
            group = group_batch(backbone, batch, grid, batch_size)
        yield group
