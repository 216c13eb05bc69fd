"""The fused linear + softmax loss (csrc/linear_softmax.cpp) against a float64 single-process reference.

Reference: -(y / |y|) . log_softmax(x W^T + b) per valid sample, mean over valid samples, computed in
float64 over all labels with dense targets. Checked: value and the gradients of x, W and b, with
chunk sizes that do and do not divide C, C smaller than a chunk, a chunk of one label, no bias,
padding rows, samples without labels, duplicate and out-of-range label ids, logits of large magnitude
whose maxima sit in different chunks (and different ranks), and on 2 and 4 spawned gloo ranks holding
label ranges (including a rank with no label at all).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.loss import head_loss
from pipeline.models.heads.rp import RPHead
from pipeline.ops.linear_softmax import linear_softmax_loss
from pipeline.parallel.label_range import split_labels
from pipeline.parallel.losses import distributed_loss
from tests.multiproc import run_ranks
from tests.reference import linear_loss_reference

TOL = 1e-5


def make_problem(rows: int, dim: int, num_labels: int, seed: int, bias: bool = True, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    w = torch.randn(num_labels, dim, generator=g) * spread
    b = torch.randn(num_labels, generator=g) * spread if bias else None
    if b is not None:
        b[num_labels // 2 :] += 40 * spread  # the upper half of the labels holds the largest logits
    counts = torch.randint(0, 4, (rows,), generator=g)
    counts[0] = 0  # a sample without labels
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, num_labels, (int(indptr[-1]),), generator=g)
    if indices.numel() > 2:
        indices[1] = indices[0]  # a duplicate (counts once)
        indices[-1] = num_labels + 7  # out of range (ignored)
    valid = torch.rand(rows, generator=g) > 0.25
    valid[:2] = True
    return x, w, b, indptr, indices, valid


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(((a.double() - b.double()).abs() <= TOL + TOL * b.double().abs()).all())


def close_to_scale(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within TOL of b, relative to b's largest magnitude: a gradient summed over many float32 terms of
    either sign (the hinge's) can be small after cancellation while its terms are not."""
    scale = b.double().abs().max() if b.numel() else 0.0
    return bool(((a.double() - b.double()).abs() <= TOL + TOL * scale).all())


def fused(x, w, b, indptr, indices, valid, label_range, group=None, chunk=64):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    b = b.clone().requires_grad_() if b is not None else None
    loss = linear_softmax_loss(x, w, b, indptr, indices, label_range, valid, group, chunk=chunk)
    grads = torch.autograd.grad(loss, [x, w] + ([b] if b is not None else []))
    return loss.detach(), grads


@pytest.mark.parametrize(
    "rows,dim,labels,chunk,bias",
    [
        (9, 5, 3001, 64, True),  # C not a multiple of the chunk
        (33, 17, 1024, 256, False),  # no bias, C a multiple
        (4, 3, 50, 1024, True),  # C smaller than one chunk
        (6, 8, 7, 1, True),  # one label per chunk
        (2, 4, 1, 16, True),  # one label: the loss is 0 and the gradient too
    ],
)
def test_matches_reference(rows, dim, labels, chunk, bias):
    problem = make_problem(rows, dim, labels, seed=rows + labels, bias=bias)
    want, want_grads = linear_loss_reference("softmax", *problem)
    got, got_grads = fused(*problem, split_labels(labels, 1, 0), chunk=chunk)
    assert close(got, want), (float(got), float(want))
    for name, g, r in zip(("x", "weight", "bias"), got_grads, want_grads, strict=False):
        assert close(g, r), f"grad of {name}: max diff {(g.double() - r).abs().max():.3g}"


def test_large_logits_and_equal_to_unfused_path():
    """Logits of magnitude ~1e3 (an unshifted exp overflows), maxima in the last chunks; the fused op
    and distributed_loss on the materialised logits agree."""
    x, w, b, indptr, indices, valid = make_problem(16, 12, 2500, seed=3, spread=30.0)
    want, want_grads = linear_loss_reference("softmax", x, w, b, indptr, indices, valid)
    got, got_grads = fused(x, w, b, indptr, indices, valid, split_labels(2500, 1, 0), chunk=512)
    assert torch.isfinite(got) and close(got, want)
    assert all(close(g, r) for g, r in zip(got_grads, want_grads, strict=True))
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    label_range = split_labels(2500, 1, 0)
    unfused = distributed_loss("softmax", xs @ ws.T + bs, indptr, indices, label_range, valid, None)
    unfused_grads = torch.autograd.grad(unfused, [xs, ws, bs])
    assert close(got, unfused) and all(close(g, u) for g, u in zip(got_grads, unfused_grads, strict=True))


def test_backward_runs_once():
    x, w, b, indptr, indices, valid = make_problem(4, 3, 100, seed=1)
    x.requires_grad_()
    loss = linear_softmax_loss(x, w, b, indptr, indices, split_labels(100, 1, 0), valid, None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


def test_head_loss_on_linear_heads_equals_the_unfused_loss():
    """head_loss on the dense and RP heads equals distributed_loss over their logits (value, gradients of
    the embeddings and of every head parameter) for the fused losses and for bce (unfused)."""
    label_range = split_labels(3000, 1, 0)
    g = torch.Generator().manual_seed(5)
    h = torch.randn(12, 32, generator=g)
    indptr = torch.arange(0, 25, 2)
    indices = torch.randint(0, 3000, (24,), generator=g)
    valid = torch.ones(12, dtype=torch.bool)
    for head in (DenseHead(32, label_range, seed=1), RPHead(32, label_range, dim=8, seed=2)):
        for kind in ("softmax", "squared_hinge", "bce"):
            results = []
            for loss_fn in (head_loss, None):
                hh = h.clone().requires_grad_()
                if loss_fn is None:
                    loss = distributed_loss(kind, head(hh), indptr, indices, label_range, valid, None)
                else:
                    loss = loss_fn(head, GroupBatch(hh, indptr, indices, valid), kind, label_range, None)
                grads = torch.autograd.grad(loss, [hh, *head.parameters()])
                results.append((loss.detach(), grads))
            (fused_loss, fused_grads), (plain_loss, plain_grads) = results
            case = (type(head).__name__, kind)
            assert close(fused_loss, plain_loss), case
            assert all(close_to_scale(a, b) for a, b in zip(fused_grads, plain_grads, strict=True)), case


def test_rejects_mismatched_shapes():
    x, w, b, indptr, indices, valid = make_problem(4, 3, 100, seed=1)
    with pytest.raises(ValueError, match="do not fit"):
        linear_softmax_loss(x, w[:50], b[:50], indptr, indices, split_labels(100, 1, 0), valid, None)
    with pytest.raises(RuntimeError, match="float32"):
        x, w = x.double(), w.double()
        linear_softmax_loss(x, w, None, indptr, indices, split_labels(100, 1, 0), valid, None)


def _sharded_worker(rank: int, world: int, labels: int, chunk: int) -> bool:
    problem = make_problem(10, 6, labels, seed=labels, spread=5.0)
    x, w, b, indptr, indices, valid = problem
    want, (want_x, want_w, want_b) = linear_loss_reference("softmax", *problem)
    lr = split_labels(labels, world, rank)
    got, (got_x, got_w, got_b) = fused(
        x, w[lr.start : lr.stop], b[lr.start : lr.stop], indptr, indices, valid, lr, dist.group.WORLD, chunk
    )
    # Each rank's x gradient is its labels' part; the sum over the group is the full gradient.
    dist.all_reduce(got_x)
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


def test_forward_op_blocks_and_exponentials():
    """The forward op's raw outputs: per chunk a contiguous [N, cc] block of exp(z - chunk max), the
    chunk maxima and sums; our vectorised exp is within a few float32 ulps of torch.exp over the whole
    range it meets (z - max from 0 down to below -87, where it stops at exp(-87))."""
    from pipeline.ops.build import load_ops

    load_ops()
    g = torch.Generator().manual_seed(11)
    n, labels, chunk = 5, 700, 256
    # small integers and multiples of 2^-12: the float32 GEMM is exact, so only the exp is measured
    x = torch.randint(-4, 5, (n, 3), generator=g).float()
    w = torch.randint(-3, 4, (labels, 3), generator=g).float()
    b = torch.round(torch.linspace(-100, 0, labels) * 4096) / 4096
    exps, chunk_max, chunk_sum = torch.ops.xmc.linear_softmax_forward(x, w, b, chunk)
    z = x.double() @ w.double().T + b.double()
    for i, c0 in enumerate(range(0, labels, chunk)):
        cc = min(chunk, labels - c0)
        block = exps[n * c0 : n * (c0 + cc)].view(n, cc)
        zc = z[:, c0 : c0 + cc]
        assert torch.equal(chunk_max[:, i].double(), zc.amax(1))
        want = torch.exp((zc - zc.amax(1, keepdim=True)).clamp(min=-87))
        err = (block.double() - want).abs()
        assert (err <= 4e-7 * want + 1e-37).all(), (err / want).max()
        assert torch.allclose(chunk_sum[:, i].double(), block.double().sum(1), rtol=1e-6)
