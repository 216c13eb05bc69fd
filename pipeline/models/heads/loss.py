"""The training loss of a head over the model-parallel group's gathered batch.

A softmax over a linear head (`LinearHead`: dense, rp) on CPU is fused with the head's product
(`pipeline.ops.linear_softmax`: the [N, C_local] logits never stream through memory); every other
case is `distributed_loss` over the head's logits. Both give the same value and gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.base import Head, LinearHead
from pipeline.ops.linear_softmax import linear_softmax_loss
from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.losses import LossKind, distributed_loss


def head_loss(
    head: Head,
    batch: GroupBatch,
    kind: LossKind,
    label_range: LabelRange,
    group: dist.ProcessGroup | None,
) -> torch.Tensor:
    """Mean loss per valid sample of the model-parallel group's gathered `batch` (embeddings [N, d],
    labels as CSR of global ids, valid [N]), the same scalar on every rank of `group`; `label_range`
    is the head's. See `distributed_loss` for the loss kinds."""
    labels = (batch.label_indptr, batch.label_indices, label_range, batch.valid, group)
    if kind == "softmax" and isinstance(head, LinearHead) and head.weight.device.type == "cpu":
        return linear_softmax_loss(head.linear_input(batch.embeddings), head.weight, head.bias, *labels)
    return distributed_loss(kind, head(batch.embeddings), *labels)
