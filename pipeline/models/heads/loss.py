"""The training loss of a head over the model-parallel group's gathered batch.

With `chunk` > 0 every head and loss kind goes through `pipeline.ops.chunked_loss`: the head's features
once, then its last layer and the loss `chunk` labels at a time, forward and (recomputing) backward, so
the [N, C_local] logits and their gradient never exist whole; optionally each chunk's parameter rows
are handed to an `update` callback in the backward (the full head gradient never exists either).
With `chunk` = 0 a softmax or squared hinge over a linear head (`LinearHead`: dense, rp) on CPU is fused
with the head's product (`pipeline.ops.linear_softmax`, `pipeline.ops.linear_hinge`: the [N, C_local]
logits never stream through memory, and the hinge's backward touches only the entries that violate the
margin); every other case is `distributed_loss` over the head's logits. All give the same value and
gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.base import Head, LinearHead
from pipeline.ops.chunked_loss import RowUpdate, chunked_loss
from pipeline.ops.linear_hinge import linear_hinge_loss
from pipeline.ops.linear_softmax import linear_softmax_loss
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.losses import LossKind, distributed_loss

FUSED = {"softmax": linear_softmax_loss, "squared_hinge": linear_hinge_loss}  # float32 linear heads, CPU


def head_loss(
    head: Head,
    batch: GroupBatch,
    kind: LossKind,
    label_range: LabelRange,
    group: dist.ProcessGroup | None,
    chunk: int = 0,
    update: RowUpdate | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Mean loss per valid sample of the model-parallel group's gathered `batch` (embeddings [N, d],
    labels as CSR of global ids, valid [N]), the same scalar on every rank of `group`; `label_range`
    is the head's. See `distributed_loss` for the loss kinds. `chunk` > 0: labels per chunk of the
    chunked loss, whose backward passes each chunk's gradient rows of the sharded parameters to
    `update(lo, hi, rows)` when it is given (see `chunked_loss`). `fused` = False keeps a linear head
    on CPU off the fused kernels (the logits path: for comparisons)."""
    ids = batch.label_indices if head.label_order is None else head.label_order.positions(batch.label_indices)
    labels = (batch.label_indptr, ids, label_range, batch.valid, group)
    if chunk > 0:
        return chunked_loss(kind, head, head.loss_features(batch.embeddings), *labels, chunk, update)
    if update is not None:
        raise ValueError("a per-chunk update needs the chunked loss (chunk > 0)")
    fusable = fused and isinstance(head, LinearHead) and head.weight.dtype == torch.float32
    if fusable and head.weight.device.type == "cpu" and kind in FUSED:
        return FUSED[kind](head.linear_input(batch.embeddings), head.weight, head.bias, *labels)
    return distributed_loss(kind, head(batch.embeddings), *labels)
