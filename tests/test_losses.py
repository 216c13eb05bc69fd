"""Distributed losses on sharded logits against plain single-process losses over all labels.

The spawned check feeds each rank its column slice of one logits matrix (with large magnitudes, so a
naive softmax would overflow and the shards' maxima differ widely) and compares value and gradient
w.r.t. the local logits with the full-label reference (tests.reference.reference_loss,
|a - b| <= 1e-5 + 1e-5 |b|); the value must be identical on every rank of the group. The end-to-end
check with the heads is in test_model_parallel.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist

from pipeline.parallel.grid import build_grid
from pipeline.parallel.label_range import LabelRange, split_labels
from pipeline.parallel.losses import LOSS_KINDS, distributed_loss
from tests.multiproc import run_ranks
from tests.reference import reference_loss, rel_err

TOL = 1e-5


def make_case(rows: int, num_labels: int, seed: int, scale: float = 30.0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, num_labels, generator=g) * scale
    z[:, : num_labels // 3] += 200  # the first shard holds the largest logits
    counts = torch.randint(0, 4, (rows,), generator=g)
    counts[0] = 0
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, num_labels, (int(indptr[-1]),), generator=g)
    valid = torch.rand(rows, generator=g) > 0.25
    valid[0] = valid[1] = True
    return z, indptr, indices, valid


def compare(kind, z, indptr, indices, valid, lr, group) -> tuple[float, float, float]:
    """(loss value, value error, local gradient error) of the distributed loss on z's columns of lr."""
    local = z[:, lr.start : lr.stop].clone().requires_grad_()
    loss = distributed_loss(kind, local, indptr, indices, lr, valid, group)
    loss.backward()
    full = z.clone().requires_grad_()
    ref = reference_loss(kind, full, indptr, indices, valid)
    ref.backward()
    return (
        loss.item(),
        rel_err(loss.detach(), ref.detach()),
        rel_err(local.grad, full.grad[:, lr.start : lr.stop]),
    )


def worker(rank: int, world: int, cases: list[tuple[int, int]]) -> list:
    results = []
    for mp, num_labels in cases:
        grid = build_grid(mp)
        lr = split_labels(num_labels, mp, grid.mp_rank)
        case = make_case(10, num_labels, seed=grid.dp_rank)
        results.append((grid.dp_rank, {k: compare(k, *case, lr, grid.mp_group) for k in LOSS_KINDS}))
    dist.barrier()
    return results


# C = 1001 over 4 ranks, the 2 x 2 grid, and a rank without labels (C = 3 over 4).
CASES = [(4, 1001), (2, 1001), (4, 3)]


def test_sharded_losses_match_single_process():
    results = run_ranks(4, worker, CASES)
    for c, (mp, num_labels) in enumerate(CASES):
        for rank, (dp_rank, by_kind) in enumerate(r[c] for r in results):
            for kind, (value, value_err, grad_err) in by_kind.items():
                assert value_err <= TOL and grad_err <= TOL, (mp, num_labels, rank, kind)
                peers = [r[c][1][kind][0] for r in results if r[c][0] == dp_rank]
                assert all(p == value for p in peers), (mp, num_labels, kind, peers)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_single_process_matches_reference(kind):
    z, indptr, indices, valid = make_case(9, 50, seed=4)
    _, value_err, grad_err = compare(kind, z, indptr, indices, valid, LabelRange(0, 50, 50), None)
    assert value_err <= TOL and grad_err <= TOL


def test_softmax_conventions():
    lr = LabelRange(0, 4, 4)
    z = torch.tensor([[1e4, 0.0, -1e4, 3.0], [1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    # Sample 0: labels {0, 3} (label 3 twice: counts once); sample 1: no labels, contributes 0.
    indptr, indices = torch.tensor([0, 3, 3]), torch.tensor([0, 3, 3])
    loss = distributed_loss("softmax", z, indptr, indices, lr, torch.tensor([True, True]), None)
    loss.backward()
    # logsumexp(z0) = 1e4; mean target logit (1e4 + 3) / 2; mean over the two valid samples.
    assert loss.item() == pytest.approx((1e4 - (1e4 + 3) / 2) / 2, rel=1e-6)
    assert torch.equal(z.grad[1], torch.zeros(4))
    assert z.grad[0].tolist() == pytest.approx([0.25, 0.0, 0.0, -0.25])


def test_padding_and_validation():
    lr = LabelRange(0, 3, 3)
    z = torch.randn(2, 3, requires_grad=True)
    indptr, indices = torch.tensor([0, 1, 2]), torch.tensor([0, 2])
    for kind in LOSS_KINDS:
        loss = distributed_loss(kind, z, indptr, indices, lr, torch.tensor([False, False]), None)
        loss.backward()
        assert loss.item() == 0 and torch.equal(z.grad, torch.zeros(2, 3)), kind
    with pytest.raises(ValueError, match="unknown loss"):
        distributed_loss("hinge", z, indptr, indices, lr, torch.tensor([True, True]), None)
    with pytest.raises(ValueError, match="do not fit"):
        distributed_loss("bce", z, indptr, indices, LabelRange(0, 4, 4), torch.tensor([True, True]), None)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_duplicate_labels_count_once(kind):
    z, indptr, indices, valid = make_case(9, 50, seed=5)
    rows = torch.repeat_interleave(torch.arange(9), torch.diff(indptr))
    # every label listed twice, in another order
    doubled = torch.cat([indices, indices.flip(0)])
    order = torch.sort(torch.cat([rows, rows.flip(0)]), stable=True).indices
    indptr2 = torch.cat([torch.zeros(1, dtype=torch.long), (2 * torch.diff(indptr)).cumsum(0)])
    lr = LabelRange(0, 50, 50)
    _, value_err, grad_err = compare(kind, z, indptr2, doubled[order], valid, lr, None)
    assert value_err <= TOL and grad_err <= TOL


def test_softmax_keeps_no_logits_and_backward_runs_once():
    x = torch.randn(4, 6, requires_grad=True)
    logits = x * 2  # its backward saves no output: only the loss could keep the logits alive
    indptr, indices = torch.tensor([0, 1, 2, 2, 3]), torch.tensor([1, 5, 0])
    loss = distributed_loss(
        "softmax", logits, indptr, indices, LabelRange(0, 6, 6), torch.ones(4, dtype=bool), None
    )
    alive = weakref.ref(logits)
    del logits
    assert alive() is None
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()
