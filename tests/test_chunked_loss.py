"""The chunked loss (pipeline/ops/chunked_loss.py) against the unfused path and the plain reference.

For the dense, RP and FFI heads and every loss kind: the value and the gradients of the embeddings and
of every head parameter equal those of `distributed_loss` over the head's logits (float32,
rel_err <= 1e-5) and of the float64 single-process reference over a float64 head (rel_err <= 1e-10),
for chunks of one label, of a size that does not divide C, of C and of more than C; the batch has
padding rows, a sample without labels and a duplicate label id. Also: a rank with an empty label range,
2 and 4 spawned gloo ranks against one process with all labels, the per-chunk `update` callback (its
rows concatenate to the unfused gradients, .grad stays None, no full-size tensor is allocated in the
backward), a group-shared sparse layer (chunks in whole groups), bfloat16 weights, `head_loss`, and a
second backward.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from pipeline.models.group_batch import GroupBatch
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.ffi import FFIHead
from pipeline.models.heads.loss import head_loss
from pipeline.models.heads.rp import RPHead
from pipeline.ops.chunked_loss import chunked_loss
from pipeline.ops.ffi_sparse import FixedFanInSparse
from pipeline.parallel.label_range import LabelRange, split_labels
from pipeline.parallel.losses import LOSS_KINDS, distributed_loss
from pipeline.parallel.model_parallel import sum_replicated_grads
from tests.multiproc import run_ranks
from tests.reference import reference_loss, rel_err

DIM, LABELS, ROWS = 12, 37, 10
CHUNKS = (1, 5, LABELS, LABELS + 13)  # one label, not dividing C, C, more than C
HEADS = {
    "dense": lambda lr: DenseHead(DIM, lr, seed=3),
    "rp": lambda lr: RPHead(DIM, lr, dim=6, seed=4),
    "ffi": lambda lr: FFIHead(DIM, lr, hidden=24, fan_in=4, seed=5),
}


def make_batch(rows: int, num_labels: int, seed: int):
    """Embeddings, CSR labels (sample 1 without labels, sample 0 with a duplicate id) and validity
    (every fourth sample from the third is padding, with zero embeddings)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, DIM, generator=g) * 2
    counts = torch.randint(1, 5, (rows,), generator=g)
    counts[0], counts[1] = 3, 0
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, num_labels, (int(indptr[-1]),), generator=g)
    indices[1] = indices[0]
    valid = torch.ones(rows, dtype=torch.bool)
    valid[2::4] = False
    x[~valid] = 0
    return x, indptr, indices, valid


def losses_and_grads(head, kind, x, indptr, indices, valid, lr, chunk, group=None, update=None):
    """(loss, dx, [grad of each head parameter]) of the chunked (chunk > 0) or unfused (0) path."""
    head.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    if chunk:
        features = head.loss_features(xx)
        loss = chunked_loss(kind, head, features, indptr, indices, lr, valid, group, chunk, update)
    else:
        loss = distributed_loss(kind, head(xx), indptr, indices, lr, valid, group)
    loss.backward()
    return loss.detach(), xx.grad, [p.grad for p in head.parameters()]


def reference(head, kind, x, indptr, indices, valid):
    """The plain single-process loss over the head's logits, with its gradients (dtype of x and head)."""
    head.zero_grad(set_to_none=True)
    xx = x.clone().requires_grad_()
    loss = reference_loss(kind, head(xx), indptr, indices, valid)
    loss.backward()
    return loss.detach(), xx.grad, [p.grad for p in head.parameters()]


def max_err(got, want) -> float:
    (loss, dx, grads), (ref_loss, ref_dx, ref_grads) = got, want
    errs = [rel_err(loss, ref_loss), rel_err(dx, ref_dx)]
    return max(errs + [rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True)])


@pytest.mark.parametrize("kind", LOSS_KINDS)
@pytest.mark.parametrize("name", sorted(HEADS))
def test_matches_unfused_and_reference(name, kind):
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=len(name) + len(kind))
    head = HEADS[name](lr)
    unfused = losses_and_grads(head, kind, x, indptr, indices, valid, lr, 0)
    head64 = HEADS[name](lr).double()
    ref64 = reference(head64, kind, x.double(), indptr, indices, valid)
    for chunk in CHUNKS:
        got = losses_and_grads(head, kind, x, indptr, indices, valid, lr, chunk)
        assert got[0].dtype == torch.float32 and max_err(got, unfused) <= 1e-5, chunk
        got64 = losses_and_grads(head64, kind, x.double(), indptr, indices, valid, lr, chunk)
        assert got64[0].dtype == torch.float64 and max_err(got64, ref64) <= 1e-10, chunk


@pytest.mark.parametrize("kind", ("bce", "squared_hinge"))
def test_empty_local_range(kind):
    """A rank without labels: a zero partial loss, zero gradients, empty parameter gradients."""
    lr = LabelRange(20, 20, LABELS)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=1)
    head = DenseHead(DIM, lr, seed=3)
    loss, dx, grads = losses_and_grads(head, kind, x, indptr, indices, valid, lr, 4)
    assert loss.item() == 0 and torch.equal(dx, torch.zeros_like(x))
    assert [g.shape for g in grads] == [(0, DIM), (0,)]


@pytest.mark.parametrize("name,kind", [("dense", "softmax"), ("ffi", "bce"), ("rp", "squared_hinge")])
def test_update_receives_the_gradient_rows(name, kind):
    """update(lo, hi, rows): chunks in order covering [0, C), rows that concatenate to the unfused
    gradients of the sharded parameters, whose .grad stays None; replicated ones get theirs as usual."""
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=2)
    head = HEADS[name](lr)
    _, want_dx, want = losses_and_grads(head, kind, x, indptr, indices, valid, lr, 0)
    calls = []
    _, dx, grads = losses_and_grads(
        head, kind, x, indptr, indices, valid, lr, 8, update=lambda lo, hi, g: calls.append((lo, hi, g))
    )
    assert [(lo, hi) for lo, hi, _ in calls] == [(lo, min(lo + 8, LABELS)) for lo in range(0, LABELS, 8)]
    assert rel_err(dx, want_dx) <= 1e-5
    sharded = {id(p) for p in head.sharded_parameters()}
    for p, got, ref in zip(head.parameters(), grads, want, strict=True):
        if id(p) in sharded:
            assert got is None
        else:
            assert rel_err(got, ref) <= 1e-5
    for j, p in enumerate(head.sharded_parameters()):
        rows = torch.cat([g[j] for _, _, g in calls])
        ref = want[[id(q) for q in head.parameters()].index(id(p))]
        assert rows.shape == p.shape and rel_err(rows, ref) <= 1e-5


class _Allocations(TorchDispatchMode):
    """Records the ops whose outputs have `rows` rows, except views."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        self.rows, self.ops = rows, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == self.rows:
                if not any(v in str(func) for v in ("view", "detach", "alias", "slice")):
                    self.ops.append(str(func))
        return out


@pytest.mark.parametrize("name", ("dense", "ffi"))
def test_backward_allocates_no_full_size_tensor(name):
    """Per-chunk gradients are taken at the parameters' row slices: without `update` the only
    full-size tensors made are the two gradients, with it none."""
    labels = 500
    lr = split_labels(labels, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, labels, seed=3)
    head = HEADS[name](lr)
    for update, expected in ((None, 2), (lambda lo, hi, g: None, 0)):
        features = head.loss_features(x.clone().requires_grad_())
        loss = chunked_loss("softmax", head, features, indptr, indices, lr, valid, None, 64, update)
        allocations = _Allocations(labels)
        with allocations:
            loss.backward()
        assert len(allocations.ops) == expected, allocations.ops


def test_backward_runs_once():
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=4)
    head = DenseHead(DIM, lr, seed=3)
    for kind in LOSS_KINDS:
        loss = chunked_loss(kind, head, x.clone().requires_grad_(), indptr, indices, lr, valid, None, 9)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="only once"):
            loss.backward()


def test_rejects_bad_arguments():
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=4)
    head = DenseHead(DIM, lr, seed=3)
    with pytest.raises(ValueError, match="unknown loss"):
        chunked_loss("hinge", head, x, indptr, indices, lr, valid, None, 4)
    with pytest.raises(ValueError, match="chunk"):
        chunked_loss("bce", head, x, indptr, indices, lr, valid, None, 0)
    with pytest.raises(ValueError, match="do not fit"):
        chunked_loss("bce", head, x[:-1], indptr, indices, lr, valid, None, 4)
    with pytest.raises(ValueError, match="do not fit"):
        chunked_loss("bce", head, x, indptr, indices, split_labels(LABELS + 1, 1, 0), valid, None, 4)


def test_head_loss_chunked_equals_default():
    """head_loss(chunk > 0) against head_loss(chunk = 0) (for the dense softmax the fused CPU kernel);
    an update without chunks is refused."""
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=5)
    head = DenseHead(DIM, lr, seed=3)
    for kind in ("softmax", "bce"):
        results = []
        for chunk in (0, 6):
            head.zero_grad(set_to_none=True)
            xx = x.clone().requires_grad_()
            loss = head_loss(head, GroupBatch(xx, indptr, indices, valid), kind, lr, None, chunk=chunk)
            loss.backward()
            results.append((loss.detach(), xx.grad, [p.grad for p in head.parameters()]))
        assert max_err(results[1], results[0]) <= 1e-5, kind
    with pytest.raises(ValueError, match="chunk > 0"):
        head_loss(head, GroupBatch(x, indptr, indices, valid), "bce", lr, None, update=lambda *a: None)


def test_group_shared_layer_is_chunked_in_whole_groups():
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=6)
    head = HEADS["ffi"](lr)
    head.sparse = FixedFanInSparse(24, LABELS, 4, seed=7, group_size=3)  # index rows per 3 labels
    calls = []
    chunk_logits = head.chunk_logits
    head.chunk_logits = lambda f, lo, hi: calls.append((lo, hi)) or chunk_logits(f, lo, hi)
    for kind in LOSS_KINDS:
        want = losses_and_grads(head, kind, x, indptr, indices, valid, lr, 0)
        for chunk in (1, 4, 8):  # rounded up to 3, 6, 9
            calls.clear()
            got = losses_and_grads(head, kind, x, indptr, indices, valid, lr, chunk)
            assert max_err(got, want) <= 1e-5, (kind, chunk)
            step = -(-chunk // 3) * 3
            assert calls == [(lo, min(lo + step, LABELS)) for lo in range(0, LABELS, step)] * 2, calls
    with pytest.raises(ValueError, match="cut a group"):
        chunk_logits(torch.ones(2, 24), 1, 5)


def test_bfloat16_weights():
    """bf16 rows are widened per chunk: the same loss and gradients as float32 weights of equal value
    (the parameter gradients come back in bf16)."""
    lr = split_labels(LABELS, 1, 0)
    x, indptr, indices, valid = make_batch(ROWS, LABELS, seed=7)
    head = DenseHead(DIM, lr, seed=3)
    for p in head.parameters():
        p.data = p.data.to(torch.bfloat16)
    wide = DenseHead(DIM, lr, seed=3)
    with torch.no_grad():
        for p, q in zip(wide.parameters(), head.parameters(), strict=True):
            p.copy_(q.float())
    for kind in LOSS_KINDS:
        loss, dx, grads = losses_and_grads(head, kind, x, indptr, indices, valid, lr, 7)
        ref_loss, ref_dx, ref_grads = losses_and_grads(wide, kind, x, indptr, indices, valid, lr, 0)
        assert rel_err(loss, ref_loss) <= 1e-5 and rel_err(dx, ref_dx) <= 1e-5, kind
        assert all(g.dtype == torch.bfloat16 for g in grads)
        assert all(rel_err(g.float(), r) <= 1e-2 for g, r in zip(grads, ref_grads, strict=True)), kind


def _sharded_worker(rank: int, world: int, num_labels: int, names: list[str], chunk: int) -> dict:
    """Each rank: its shard of each head and the whole batch; the sum over ranks of dx (and of the
    replicated gradients) and the local rows of the sharded gradients against one process."""
    lr = split_labels(num_labels, world, rank)
    x, indptr, indices, valid = make_batch(ROWS, num_labels, seed=8)
    errors, losses = {}, {}
    for name in names:
        head, full = HEADS[name](lr), HEADS[name](LabelRange(0, num_labels, num_labels))
        sharded = {id(p) for p in head.sharded_parameters()}
        for kind in LOSS_KINDS:
            loss, dx, grads = losses_and_grads(
                head, kind, x, indptr, indices, valid, lr, chunk, group=dist.group.WORLD
            )
            dist.all_reduce(dx)
            sum_replicated_grads(head.replicated_parameters(), dist.group.WORLD)
            ref_loss, ref_dx, ref_grads = reference(full, kind, x, indptr, indices, valid)
            errs = [rel_err(loss, ref_loss), rel_err(dx, ref_dx)]
            for p, g, r in zip(head.parameters(), grads, ref_grads, strict=True):
                errs.append(rel_err(p.grad, r[lr.start : lr.stop] if id(p) in sharded else r))
                assert g is p.grad
            errors[name, kind], losses[name, kind] = max(errs), loss.item()
    dist.barrier()
    return {"errors": errors, "losses": losses}


@pytest.mark.parametrize(
    "world,labels,names,chunk",
    [(2, LABELS, sorted(HEADS), 7), (4, 3, ["dense"], 1)],  # 4 ranks of C = 3: one holds no label
    ids=["world2", "world4"],
)
def test_label_sharded_ranks_match_single_process(world, labels, names, chunk):
    results = run_ranks(world, _sharded_worker, labels, names, chunk)
    for rank, result in enumerate(results):
        assert max(result["errors"].values()) <= 1e-5, (rank, result["errors"])
        assert result["losses"] == results[0]["losses"], "the loss differs between ranks"
