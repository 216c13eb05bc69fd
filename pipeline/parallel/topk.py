"""Global top-k over logits split by label range: local top-k, all-gather the candidates, merge.

The global top k of a sample is among the union of the ranks' local top k, so each rank sends only
k (score, label id) pairs per sample. Order is total and deterministic: higher score first, then the
smaller label id; every rank of the group merges the same candidates and returns the same result.
When k exceeds the number of labels, the missing entries have score -inf and label id -1.
NaN logits are not supported.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.parallel.label_range import LabelRange
from pipeline.parallel.model_parallel import group_size


def sort_candidates(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first k of each row by (score descending, id ascending), via two stable sorts."""
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    by_score = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, by_score), ids.gather(1, by_score)


def local_topk(
    logits_local: torch.Tensor, k: int, label_range: LabelRange
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top k of the local logits [N, C_local] with global ids, padded with (-inf, num_labels) to k.

    torch.topk may break ties arbitrarily, so the selection is rebuilt from its k-th value: everything
    above it, then the tied entries of smallest id (columns are in id order) until k are taken.
    """
    n, c = logits_local.shape
    pad = max(k - c, 0)
    x = torch.nn.functional.pad(logits_local, (0, pad), value=-torch.inf)
    kth = x.topk(k, dim=1).values[:, -1:]
    above, tied = x > kth, x == kth
    take = above | (tied & (tied.cumsum(1) <= k - above.sum(1, keepdim=True)))
    cols = take.nonzero()[:, 1].view(n, k)
    ids = torch.where(cols < c, cols + label_range.start, label_range.num_labels)
    return sort_candidates(x.gather(1, cols), ids, k)


def distributed_topk(
    logits_local: torch.Tensor, k: int, label_range: LabelRange, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N, k], global label ids [N, k] int64) of the top k over all labels of the group."""
    scores, ids = local_topk(logits_local, k, label_range)
    size = group_size(group)
    if size > 1:
        all_scores = [torch.empty_like(scores) for _ in range(size)]
        all_ids = [torch.empty_like(ids) for _ in range(size)]
        dist.all_gather(all_scores, scores.contiguous(), group=group)
        dist.all_gather(all_ids, ids.contiguous(), group=group)
        scores, ids = sort_candidates(torch.cat(all_scores, 1), torch.cat(all_ids, 1), k)
    return scores, torch.where(ids < label_range.num_labels, ids, -1)
