"""The fused linear + squared hinge loss (csrc/linear_hinge.cpp) against a float64 single-process reference.

Reference: sum over labels of max(0, 1 - (2y - 1) z)^2 with z = x W^T + b per valid sample, mean over
valid samples, float64 over all labels with dense targets (`tests.reference.linear_loss_reference`).
Checked: value and the gradients of x, W and b with chunk sizes that do and do not divide C, C smaller
than a chunk, one label per chunk, no bias, padding rows, samples without labels, duplicate and
out-of-range label ids, margins violated by almost every entry and by almost none; the sparse
gradient entries themselves; 2 and 4 spawned gloo ranks holding label ranges (one rank with no label).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.ops.build import load_ops
from pipeline.ops.linear_hinge import linear_hinge_loss
from pipeline.parallel.label_range import split_labels
from pipeline.parallel.losses import distributed_loss
from tests.multiproc import run_ranks
from tests.reference import linear_loss_reference
from tests.test_linear_softmax import close_to_scale as close
from tests.test_linear_softmax import make_problem


def fused(x, w, b, indptr, indices, valid, label_range, group=None, chunk=64):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    loss = linear_hinge_loss(x, w, b, indptr, indices, label_range, valid, group, chunk=chunk)
    grads = torch.autograd.grad(loss, [x, w] + ([b] if b is not None else []))
    return loss.detach(), grads


@pytest.mark.parametrize(
    "rows,dim,labels,chunk,bias,spread",
    [
        (9, 5, 3001, 64, True, 1.0),  # C not a multiple of the chunk; most margins violated
        (33, 17, 1024, 256, False, 1.0),  # no bias, C a multiple
        (4, 3, 50, 1024, True, 0.3),  # C smaller than one chunk
        (6, 8, 7, 1, True, 1.0),  # one label per chunk
        (40, 16, 2000, 128, True, 0.02),  # small weights: few violated margins besides the targets
    ],
)
def test_matches_reference(rows, dim, labels, chunk, bias, spread):
    x, w, b, indptr, indices, valid = make_problem(rows, dim, labels, seed=rows + labels, bias=bias)
    w = w * spread
    if b is not None:
        b = b * spread - 1.5  # most labels below the margin, as in a trained classifier
    want, want_grads = linear_loss_reference("squared_hinge", x, w, b, indptr, indices, valid)
    got, got_grads = fused(x, w, b, indptr, indices, valid, split_labels(labels, 1, 0), chunk=chunk)
    assert close(got, want), (float(got), float(want))
    for name, g, r in zip(("x", "weight", "bias"), got_grads, want_grads, strict=False):
        assert close(g, r), f"grad of {name}: max diff {(g.double() - r).abs().max():.3g}"


def test_equal_to_unfused_path():
    x, w, b, indptr, indices, valid = make_problem(16, 12, 2500, seed=3)
    label_range = split_labels(2500, 1, 0)
    got, got_grads = fused(x, w, b, indptr, indices, valid, label_range, chunk=512)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    unfused = distributed_loss("squared_hinge", xs @ ws.T + bs, indptr, indices, label_range, valid, None)
    unfused_grads = torch.autograd.grad(unfused, [xs, ws, bs])
    assert close(got, unfused) and all(close(g, u) for g, u in zip(got_grads, unfused_grads, strict=True))


def test_forward_keeps_exactly_the_violated_entries():
    """The forward op's sparse gradient: one entry per (row, label) whose margin is violated, grouped by
    chunk, with value d loss / d z; nothing else. Integer inputs make the float32 product exact."""
    load_ops()
    g = torch.Generator().manual_seed(4)
    n, labels, chunk = 6, 300, 64
    x = torch.randint(-2, 3, (n, 4), generator=g).float()
    w = torch.randint(-1, 2, (labels, 4), generator=g).float()
    b = torch.randint(-4, 1, (labels,), generator=g).float()
    indptr = torch.tensor([0, 2, 2, 5, 6, 6, 8])
    cols = torch.tensor([3, 250, 0, 64, 299, 7, 1, 2])
    row_loss, offsets, rows, got_cols, vals = torch.ops.xmc.linear_hinge_forward(x, w, b, indptr, cols, chunk)
    z = x.double() @ w.double().T + b.double()
    s = -torch.ones_like(z)
    s[torch.repeat_interleave(torch.arange(n), indptr.diff()), cols] = 1
    margin = (1 - s * z).clamp(min=0)
    assert torch.allclose(row_loss.double(), margin.square().sum(1))
    want = margin.nonzero()
    got = torch.stack([rows.long(), got_cols.long()], 1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    assert torch.equal(vals.double(), (-2 * s * margin)[rows.long(), got_cols.long()])
    chunk_of = got_cols.long() // chunk
    for i in range(offsets.numel() - 1):
        assert (chunk_of[offsets[i] : offsets[i + 1]] == i).all()


def test_rejects_bad_targets_and_shapes():
    load_ops()
    x, w = torch.randn(2, 3), torch.randn(10, 3)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.xmc.linear_hinge_forward(x, w, None, torch.tensor([0, 1, 1]), torch.tensor([10]), 4)
    with pytest.raises(RuntimeError, match="distinct and ascending"):
        torch.ops.xmc.linear_hinge_forward(x, w, None, torch.tensor([0, 2, 2]), torch.tensor([3, 3]), 4)
    _, w2, b2, indptr, indices, valid = make_problem(2, 3, 10, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        linear_hinge_loss(x, w2[:5], b2[:5], indptr, indices, split_labels(10, 1, 0), valid, None)
    with pytest.raises(RuntimeError, match="float32"):
        linear_hinge_loss(x.double(), w2.double(), None, indptr, indices, split_labels(10, 1, 0), valid, None)


def _sharded_worker(rank: int, world: int, labels: int, chunk: int) -> bool:
    x, w, b, indptr, indices, valid = make_problem(10, 6, labels, seed=labels, spread=0.5)
    b = b - 20  # make_problem lifts half of the biases by 20: bring them back near the margin
    want, (want_x, want_w, want_b) = linear_loss_reference("squared_hinge", x, w, b, indptr, indices, valid)
    lr = split_labels(labels, world, rank)
    got, (got_x, got_w, got_b) = fused(
        x, w[lr.start : lr.stop], b[lr.start : lr.stop], indptr, indices, valid, lr, dist.group.WORLD, chunk
    )
    dist.all_reduce(got_x)  # each rank's x gradient is its labels' part
    values = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(values, got)
    assert all(bool(v == got) for v in values), "the loss differs between ranks"
    assert close(got, want), (float(got), float(want))
    assert close(got_x, want_x), f"x grad: {(got_x.double() - want_x).abs().max():.3g}"
    assert close(got_w, want_w[lr.start : lr.stop]) and close(got_b, want_b[lr.start : lr.stop])
    return True


@pytest.mark.parametrize("world,labels,chunk", [(2, 1001, 128), (4, 3, 2)])
def test_label_sharded_ranks_match_reference(world, labels, chunk):
    """2 ranks with 500/501 labels, 4 ranks with 3 labels (one rank holds none)."""
    assert run_ranks(world, _sharded_worker, labels, chunk) == [True] * world
