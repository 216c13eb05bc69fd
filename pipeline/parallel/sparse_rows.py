"""Row-sparse gradient exchange: every rank's (ids, rows) in, the rows averaged over all ranks out.

The bag-of-words table's gradient has a nonzero row only for the feature ids a batch touches (a few
thousand of 35k at batch 256 on tf-idf data). A dense all-reduce moves and sums every row; here only
the touched rows travel:

  1. local coalesce: repeated ids (several micro-batches) are summed into one row each;
  2. all-gather the row counts (one int64 per rank);
  3. all-gather the ids and the rows, each padded to the largest count (gloo gathers equal shapes);
  4. every rank sums the rows of equal ids (`index_add_` of each rank's part, in rank order) and
     scales by 1/world, as DeepSpeed's ZeRO averages a dense gradient (sum, then times 1/world).

Steps 3-4 run the same deterministic operations on the same gathered tensors on every rank, so every
rank gets bit-identical rows: the replicated table they update stays identical everywhere (on ranks
of one kind of CPU/GPU; a floating-point kernel that differs between machine types would let the
replicas drift, which ZeRO avoids by all-gathering its updated partitions).

Cost per rank: receives (world - 1) x max_count x width values; sums world x max_count rows. Against a
dense all-reduce (about 2 x num_rows x width values per rank) this wins while world x touched rows <
2 x num_rows; at large worlds an all-reduce over the union of the ids would scale better (the union's
ids first, then a [union, width] buffer all-reduced), not needed at 2-8 ranks.
No all_gather_object: tensors only, so nothing is pickled on the hot path.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def coalesce_rows(ids: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the rows of equal ids: ids int64 [n], rows [n, w] -> (sorted unique ids [u], rows [u, w]).

    Returns the inputs themselves when the ids are already sorted and unique (one micro-batch of the
    sparse bag: no copy). Rows of one id are summed in input order (deterministic)."""
    unique, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    if unique.numel() == ids.numel() and torch.equal(unique, ids):
        return ids, rows
    summed = rows.new_zeros(unique.numel(), rows.shape[1])
    summed.index_add_(0, inverse, rows)
    return unique, summed


def average_rows(
    ids: torch.Tensor, rows: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the ranks of `group` (default: the world) of a row-sparse tensor. Collective.

    ids int64 [n] (any order, repeats allowed, n may be 0 on some ranks), rows [n, w] on the device of
    the group's collectives. Returns (sorted unique ids [u] of all ranks, rows [u, w]) equal to
    `sum over ranks of dense(ids, rows) / world` restricted to its touched rows; identical on every
    rank. Three collectives (counts, ids, rows); the second and third are skipped when no rank has a
    row."""
    world = dist.get_world_size(group)
    ids, rows = coalesce_rows(ids, rows)
    count = torch.tensor([ids.numel()], dtype=torch.int64, device=ids.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in torch.cat(counts).tolist()]
    width, longest = rows.shape[1], max(sizes)
    if longest == 0:
        return ids, rows
    if ids.numel() < longest:  # pad to the longest: id -1 and zero rows, cut off again below
        pad = longest - ids.numel()
        ids = torch.cat([ids, ids.new_full((pad,), -1)])
        rows = torch.cat([rows, rows.new_zeros(pad, width)])
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    all_rows = [torch.empty_like(rows) for _ in range(world)]
    dist.all_gather(all_ids, ids.contiguous(), group=group)
    dist.all_gather(all_rows, rows.contiguous(), group=group)
    gathered_ids = torch.cat([t[:n] for t, n in zip(all_ids, sizes, strict=True)])
    unique, inverse = torch.unique(gathered_ids, sorted=True, return_inverse=True)
    summed = rows.new_zeros(unique.numel(), width)
    for part, (received, n) in zip(inverse.split(sizes), zip(all_rows, sizes, strict=True), strict=True):
        summed.index_add_(0, part, received[:n])  # rank by rank: no concatenated copy of the rows
    return unique, summed.mul_(1.0 / world)
