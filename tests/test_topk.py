"""Distributed top-k equals a full single-process sort by (score descending, label id ascending).

Logits are drawn from a few integer values so that ties are everywhere, plus -inf entries; k exceeds
some ranks' local label counts and, in one case, the number of labels (padding: score -inf, id -1).
Every rank of a model-parallel group must return exactly the same result.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.parallel.grid import build_grid
from pipeline.parallel.label_range import LabelRange, split_labels
from pipeline.parallel.topk import distributed_topk
from tests.multiproc import run_ranks
from tests.reference import reference_topk

K = 5


def make_logits(rows: int, num_labels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (rows, num_labels), generator=g).float()
    x[0] = -torch.inf  # only -inf: real labels by id, then padding
    x[1, ::2] = -torch.inf
    x[2] = torch.randn(num_labels, generator=g)  # no ties
    return x


def worker(rank: int, world: int, cases: list[tuple[int, int]]) -> list:
    results = []
    for mp, num_labels in cases:
        grid = build_grid(mp)
        lr = split_labels(num_labels, mp, grid.mp_rank)
        x = make_logits(12, num_labels, seed=grid.dp_rank)
        scores, ids = distributed_topk(x[:, lr.start : lr.stop], K, lr, grid.mp_group)
        results.append((grid.dp_rank, scores, ids))
    dist.barrier()
    return results


# (mp, C): C = 1001 over 4 ranks; k above some local sizes (C = 10 over 4: 3, 3, 2, 2); k above C;
# a rank without labels (C = 3 over 4); the 2 x 2 grid; groups of one rank (dp = 2, mp = 1).
CASES = {2: [(2, 37), (1, 37), (2, 3)], 4: [(4, 1001), (4, 10), (4, 3), (2, 1001)]}


@pytest.mark.parametrize("world", sorted(CASES), ids=lambda w: f"world{w}")
def test_distributed_topk_matches_full_sort(world):
    results = run_ranks(world, worker, CASES[world])
    for c, (mp, num_labels) in enumerate(CASES[world]):
        for rank, (dp_rank, scores, ids) in enumerate(r[c] for r in results):
            ref_scores, ref_ids = reference_topk(make_logits(12, num_labels, seed=dp_rank), K)
            assert torch.equal(ids, ref_ids), (mp, num_labels, rank)
            assert torch.equal(scores, ref_scores), (mp, num_labels, rank)


def test_single_process_ties_and_padding():
    x = torch.tensor([[1.0, 2, 2, 0, 2, 5], [0, 0, 0, 0, 0, 0]])
    scores, ids = distributed_topk(x, 4, LabelRange(0, 6, 6), None)
    assert ids.tolist() == [[5, 1, 2, 4], [0, 1, 2, 3]]
    assert scores.tolist() == [[5, 2, 2, 2], [0, 0, 0, 0]]
    scores, ids = distributed_topk(x[:, 2:4], 3, LabelRange(2, 4, 6), None)  # a shard, k above its size
    assert ids.tolist() == [[2, 3, -1], [2, 3, -1]] and scores[:, 2].isinf().all()
    for seed in range(3):
        x = make_logits(6, 50, seed)
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                distributed_topk(x, 7, LabelRange(0, 50, 50), None), reference_topk(x, 7), strict=True
            )
        )
