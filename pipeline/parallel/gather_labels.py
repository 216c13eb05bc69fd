"""All-gather label CSR and validity masks within the model-parallel group.

The output layer scores the embeddings of the whole group (gathered in group-rank order), so the
distributed loss needs the group's targets in the same order. Batches are padded to one size in the
group, so row lengths and masks travel in one fixed-size all-gather; the label ids, whose count
differs per rank, in one padded all-gather after their counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def gather_labels(
    indptr: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indptr, indices, valid) of the concatenated batches of the group, in group-rank order.

    Every rank of the group must pass the same number of rows (the trainer pads batches). The inputs
    must be on the group's collective device (the GPU under nccl); the outputs are too."""
    size = 1 if group is None else dist.get_world_size(group)
    if size == 1:
        return indptr, indices, valid
    rows = torch.stack([torch.diff(indptr), valid.to(torch.int64)])  # [2, B]
    all_rows = [torch.empty_like(rows) for _ in range(size)]
    dist.all_gather(all_rows, rows, group=group)
    counts = [int(r[0].sum()) for r in all_rows]
    padded = indices.new_zeros(max(counts))
    padded[: indices.numel()] = indices
    all_ids = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(all_ids, padded, group=group)
    lengths = torch.cat([r[0] for r in all_rows])
    all_indptr = indptr.new_zeros(lengths.numel() + 1)
    torch.cumsum(lengths, 0, out=all_indptr[1:])
    ids = torch.cat([i[:n] for i, n in zip(all_ids, counts, strict=True)])
    return all_indptr, ids, torch.cat([r[1] for r in all_rows]).bool()
