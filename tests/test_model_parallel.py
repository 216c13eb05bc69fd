"""The model-parallel output layer end to end, on real gloo ranks, against one process with all labels.

Each rank embeds its own n samples; the group all-gathers them, scores its label range with its
DenseHead shard and takes a distributed loss. Loss, logits and the gradients of the embeddings and of
every shard's parameters must equal those of a single DenseHead over all C labels on the group's batch
(|a - b| <= 1e-5 + 1e-5 |b|, float32), for every loss, with padding samples and samples without labels.
One spawn per world size runs several grids (build_grid) in turn, to keep process launches few.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.models.heads.dense import DenseHead
from pipeline.parallel.grid import build_grid
from pipeline.parallel.label_range import LabelRange, split_labels
from pipeline.parallel.losses import distributed_loss
from pipeline.parallel.model_parallel import gather_embeddings, sum_replicated_grads
from tests.multiproc import run_ranks
from tests.reference import reference_loss, rel_err

N_PER_RANK, DIM, TOL = 5, 8, 1e-5
KINDS = ("softmax", "multiclass", "bce", "squared_hinge")


def make_batch(rows: int, num_labels: int, seed: int, multiclass: bool = False):
    """Embeddings, CSR targets (some rows empty, some ids repeated across rows) and a validity mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, DIM, generator=g)
    counts = torch.ones(rows, dtype=torch.long) if multiclass else torch.randint(0, 5, (rows,), generator=g)
    if not multiclass:
        counts[1] = 0
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, num_labels, (int(indptr[-1]),), generator=g)
    valid = torch.ones(rows, dtype=torch.bool)
    valid[2::4] = False
    return x, indptr, indices, valid


def csr_rows(indptr: torch.Tensor, indices: torch.Tensor, a: int, b: int):
    return indptr[a : b + 1] - indptr[a], indices[indptr[a] : indptr[b]]


def _check_grid(rank: int, world: int, mp: int, num_labels: int) -> dict:
    grid = build_grid(mp)
    lr = split_labels(num_labels, mp, grid.mp_rank)
    group_rows = slice(grid.dp_rank * mp * N_PER_RANK, (grid.dp_rank + 1) * mp * N_PER_RANK)
    own = slice(grid.mp_rank * N_PER_RANK, (grid.mp_rank + 1) * N_PER_RANK)  # within the group's batch
    out: dict = {"errors": {}, "losses": {}, "dp_rank": grid.dp_rank}
    for kind in KINDS:
        batch = make_batch(world * N_PER_RANK, num_labels, 1, multiclass=kind == "multiclass")
        x_all, indptr_all, indices_all, valid_all = batch
        x = x_all[group_rows]
        indptr, indices = csr_rows(indptr_all, indices_all, group_rows.start, group_rows.stop)
        valid = valid_all[group_rows]
        loss_kind = "softmax" if kind == "multiclass" else kind

        head = DenseHead(DIM, lr, seed=3)
        h = x[own].clone().requires_grad_()
        logits = head(gather_embeddings(h, grid.mp_group))
        loss = distributed_loss(loss_kind, logits, indptr, indices, lr, valid, grid.mp_group)
        loss.backward()

        ref_head = DenseHead(DIM, LabelRange(0, num_labels, num_labels), seed=3)
        x_ref = x.clone().requires_grad_()
        ref_logits = ref_head(x_ref)
        ref_loss = reference_loss(kind, ref_logits, indptr, indices, valid)
        ref_loss.backward()

        cols = slice(lr.start, lr.stop)
        out["errors"][kind] = {
            "loss": rel_err(loss.detach(), ref_loss.detach()),
            "logits": rel_err(logits.detach(), ref_logits.detach()[:, cols]),
            "grad_embeddings": rel_err(h.grad, x_ref.grad[own]),
            "grad_weight": rel_err(head.weight.grad, ref_head.weight.grad[cols]),
            "grad_bias": rel_err(head.bias.grad, ref_head.bias.grad[cols]),
        }
        out["losses"][kind] = loss.item()
    return out


def _check_collectives(rank: int, world: int, mp: int) -> dict:
    """gather_embeddings with different upstream gradients per rank; sum_replicated_grads."""
    grid = build_grid(mp)
    h = torch.full((2, 3), float(rank)).requires_grad_()
    gathered = gather_embeddings(h, grid.mp_group)
    members = [grid.dp_rank * mp + r for r in range(mp)]
    upstream = {r: torch.randn(2 * mp, 3, generator=torch.Generator().manual_seed(r)) for r in members}
    (gathered * upstream[rank]).sum().backward()
    own = slice(grid.mp_rank * 2, grid.mp_rank * 2 + 2)
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), rank + 1.0)
    sum_replicated_grads([p], grid.mp_group)
    return {
        "gathered": torch.equal(gathered.detach(), torch.cat([torch.full((2, 3), r * 1.0) for r in members])),
        "grad_error": float((h.grad - sum(upstream[r][own] for r in members)).abs().max()),
        "replicated": torch.equal(p.grad, torch.full((4,), float(sum(r + 1 for r in members)))),
    }


def worker(rank: int, world: int, cases: list[tuple[int, int]]) -> list:
    torch.manual_seed(0)
    results = [(_check_collectives(rank, world, mp), _check_grid(rank, world, mp, c)) for mp, c in cases]
    dist.barrier()
    return results


# (mp, C) per world size: 2 ranks as one mp group and as dp=2 x mp=1; 4 ranks with C=1001 over mp=4,
# the 2 x 2 grid, and C=3 over mp=4 (one rank owns no label).
CASES = {1: [(1, 1001)], 2: [(2, 37), (1, 37)], 4: [(4, 1001), (2, 1001), (4, 3)]}


@pytest.mark.parametrize("world", sorted(CASES), ids=lambda w: f"world{w}")
def test_split_head_matches_single_process(world):
    results = run_ranks(world, worker, CASES[world])
    for c, (mp, num_labels) in enumerate(CASES[world]):
        for rank, (collectives, grid) in enumerate(r[c] for r in results):
            case = f"mp={mp} C={num_labels} rank={rank}"
            assert collectives["gathered"] and collectives["replicated"], case
            assert collectives["grad_error"] < 1e-6, case
            for kind, errors in grid["errors"].items():
                assert max(errors.values()) <= TOL, (case, kind, errors)
            peers = [r[c][1] for r in results if r[c][1]["dp_rank"] == grid["dp_rank"]]
            assert all(p["losses"] == grid["losses"] for p in peers), f"{case}: loss differs within the group"


def test_dense_init_is_independent_of_the_split():
    full = DenseHead(16, LabelRange(0, 10_001, 10_001), seed=5)
    for mp in (2, 3, 4):
        shards = [DenseHead(16, split_labels(10_001, mp, r), seed=5) for r in range(mp)]
        assert torch.equal(torch.cat([s.weight for s in shards]), full.weight)
        assert torch.equal(torch.cat([s.bias for s in shards]), full.bias)
    assert not torch.equal(DenseHead(16, LabelRange(0, 10, 10), seed=6).weight, full.weight[:10])
    assert full.replicated_parameters() == [] and len(full.sharded_parameters()) == 2


def test_no_group_is_identity():
    h = torch.randn(4, 3, requires_grad=True)
    assert gather_embeddings(h, None) is h
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    sum_replicated_grads([p], None)
    assert torch.equal(p.grad, torch.ones(2))
