"""All-gather label CSR and validity masks within the model-parallel group.

The output layer scores the embeddings of the whole group (gathered in group-rank order), so the
distributed loss needs the group's targets in the same order. Labels are small next to embeddings:
row lengths, ids and masks travel as padded tensors in three all-gathers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _gather_padded(t: torch.Tensor, group: dist.ProcessGroup, size: int) -> list[torch.Tensor]:
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(lengths, torch.tensor([t.numel()], dtype=torch.int64), group=group)
    longest = int(max(n.item() for n in lengths))
    padded = torch.zeros(longest, dtype=t.dtype)
    padded[: t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return [p[: int(n.item())] for p, n in zip(parts, lengths, strict=True)]


def gather_labels(
    indptr: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indptr, indices, valid) of the concatenated batches of the group, in group-rank order."""
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return indptr, indices, valid
    row_lengths = _gather_padded(torch.diff(indptr), group, size)
    ids = _gather_padded(indices.to(torch.int64), group, size)
    masks = _gather_padded(valid.to(torch.int64), group, size)
    lengths = torch.cat(row_lengths)
    all_indptr = torch.zeros(lengths.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=all_indptr[1:])
    return all_indptr, torch.cat(ids), torch.cat(masks).bool()
