"""The random-projection head and the dual recovery of a full classifier from it.

- R is a function of the seed alone: identical on every rank (real spawned ranks), different for
  another seed, regenerated from the checkpointed seed on load; V's rows do not depend on the split.
- forward and gradients equal a float64 reference; the head learns a planted multi-label problem.
- Recovery (Zhang et al., COLT 2013) lands close to the directly computed regularised optimum of a
  small multi-class problem, far closer than back-projecting the slim model, and gives the same
  classifier on one process, on two model-parallel ranks and on two data-parallel replicas.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.heads.rp import RPHead, projection_matrix
from pipeline.models.recovery import recover_dense_head
from pipeline.parallel.label_range import split_labels
from pipeline.parallel.losses import distributed_loss
from tests.multiproc import run_ranks
from tests.reference import dense_targets


def csr(label_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    indptr = torch.tensor([0] + [len(ls) for ls in label_lists], dtype=torch.int64).cumsum(0)
    indices = torch.tensor([i for ls in label_lists for i in ls], dtype=torch.int64)
    return indptr, indices


def rows_of(
    indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR of a subset of rows, in the given order."""
    lengths = indptr[rows + 1] - indptr[rows]
    new_indptr = torch.zeros(rows.numel() + 1, dtype=torch.int64)
    new_indptr[1:] = lengths.cumsum(0)
    starts = torch.repeat_interleave(indptr[rows] - new_indptr[:-1], lengths)
    return new_indptr, indices[starts + torch.arange(int(new_indptr[-1]))]


# ---------------------------------------------------------------- R and V: identical wherever built


def _head_worker(rank: int, world: int, num_labels: int, d: int, k: int, seed: int) -> dict:
    from pipeline.parallel.grid import build_grid

    grid = build_grid(world)  # mp = world: the label range is split over both ranks
    head = RPHead(d, split_labels(num_labels, grid.mp, grid.mp_rank), k, seed)
    other = RPHead(d, split_labels(num_labels, grid.mp, grid.mp_rank), k, seed + 1)
    return {
        "R": head.R.numpy().copy(),
        "R_other": other.R.numpy().copy(),
        "V": head.weight.detach().numpy().copy(),
    }


def test_projection_identical_on_ranks_and_slim_rows_independent_of_split():
    num_labels, d, k, seed = 9001, 48, 8, 11  # ranges of 4501 and 4500 cut an INIT_BLOCK in two
    ranks = run_ranks(2, _head_worker, num_labels, d, k, seed)
    single = RPHead(d, split_labels(num_labels, 1, 0), k, seed)
    for r in ranks:
        assert np.array_equal(r["R"], single.R.numpy())
        assert not np.allclose(r["R_other"], r["R"])
    assert np.array_equal(np.concatenate([r["V"] for r in ranks]), single.weight.detach().numpy())
    assert ranks[0]["V"].shape == (4501, k) and ranks[1]["V"].shape == (4500, k)
    # entries N(0, 1/k): k * var(R) = 1, checked loosely on these 384 draws
    assert abs(single.R.var().item() * k - 1) < 0.25
    assert not single.R.requires_grad and [p for p in single.parameters()] == single.sharded_parameters()
    assert single.replicated_parameters() == []


def test_projection_regenerated_from_checkpointed_seed():
    rng = split_labels(300, 1, 0)
    trained = RPHead(32, rng, 8, seed=5)
    with torch.no_grad():
        trained.weight.add_(1.0)
    state = trained.state_dict()
    assert set(state) == {"weight", "bias", "seed"}  # R is never stored
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    resumed = RPHead(32, rng, 8, seed=99)  # built with another seed: loading must bring R back
    assert not torch.equal(resumed.R, trained.R)
    resumed.load_state_dict(torch.load(buf))
    assert int(resumed.seed) == 5
    assert torch.equal(resumed.R, trained.R) and torch.equal(resumed.weight, trained.weight)
    assert torch.equal(resumed.R, projection_matrix(32, 8, 5))
    h = torch.randn(4, 32)
    assert torch.equal(resumed(h), trained(h))
    same = RPHead(32, rng, 8, seed=5).double()
    same.load_state_dict(state)
    assert same.R.dtype == torch.float64 and torch.equal(same.R, trained.R.double())


def test_forward_and_gradients_match_float64_reference():
    gen = torch.Generator().manual_seed(0)
    head = RPHead(40, split_labels(70, 3, 1), 6, seed=2)
    with torch.no_grad():
        head.bias.normal_(generator=gen)
    h = torch.randn(9, 40, generator=gen, requires_grad=True)
    upstream = torch.randn(9, head.label_range.size, generator=gen)
    out = head(h)
    out.backward(upstream)
    ref_h = h.detach().double().requires_grad_()
    ref_v = head.weight.detach().double().requires_grad_()
    ref_b = head.bias.detach().double().requires_grad_()
    ref = (ref_h @ head.R.double()) @ ref_v.T + ref_b
    ref.backward(upstream.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in [(h.grad, ref_h.grad), (head.weight.grad, ref_v.grad), (head.bias.grad, ref_b.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert head.R.grad is None


# ---------------------------------------------------------------- the RP head learns


def planted_multilabel(
    n: int, d: int, num_labels: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = sum of the prototypes of the sample's 1-4 labels (Zipf-like popularity) + noise of norm ~1."""
    gen = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_labels, d, generator=gen) / math.sqrt(d)
    popularity = torch.arange(1, num_labels + 1).float() ** -0.7
    counts = torch.randint(1, 5, (n,), generator=gen)
    labels = [torch.multinomial(popularity, int(c), generator=gen).tolist() for c in counts]
    indptr, indices = csr(labels)
    rows = torch.repeat_interleave(torch.arange(n), counts)
    h = torch.zeros(n, d).index_add_(0, rows, prototypes[indices])
    return h + torch.randn(n, d, generator=gen) / math.sqrt(d), indptr, indices


def precision_at_1(top: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor) -> float:
    rows = torch.repeat_interleave(torch.arange(top.numel()), torch.diff(indptr))
    hit = torch.zeros(top.numel(), dtype=torch.bool)
    hit[rows[indices == top[rows]]] = True
    return hit.float().mean().item()


def test_rp_head_learns_planted_multilabel_problem():
    n_train, n_test, d, k, num_labels = 4000, 1000, 256, 32, 500
    h, indptr, indices = planted_multilabel(n_train + n_test, d, num_labels, seed=0)
    train_ptr, train_ids = rows_of(indptr, indices, torch.arange(n_train))
    test_ptr, test_ids = rows_of(indptr, indices, torch.arange(n_train, n_train + n_test))
    torch.manual_seed(0)
    head = RPHead(d, split_labels(num_labels, 1, 0), k, seed=1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _epoch in range(25):
        order = torch.randperm(n_train)
        for b in range(0, n_train, 256):
            rows = order[b : b + 256]
            b_ptr, b_ids = rows_of(train_ptr, train_ids, rows)
            valid = torch.ones(rows.numel(), dtype=torch.bool)
            loss = distributed_loss("softmax", head(h[rows]), b_ptr, b_ids, head.label_range, valid, None)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        p1 = precision_at_1(head(h[n_train:]).argmax(1), test_ptr, test_ids)
    most_popular = torch.bincount(train_ids, minlength=num_labels).argmax()
    popularity_p1 = precision_at_1(most_popular.expand(n_test), test_ptr, test_ids)
    print(f"RP head (d={d}, k={k}, C={num_labels}) P@1 {p1:.3f}, popularity P@1 {popularity_p1:.3f}")
    assert p1 > 0.6 and p1 > 3 * popularity_p1


# ---------------------------------------------------------------- recovery against the exact optimum


def regularised_softmax_regression(
    x: torch.Tensor, y: torch.Tensor, num_labels: int, lam: float
) -> torch.Tensor:
    """argmin_W (1/n) sum_i CE(W x_i, y_i) + (lam/2) ||W||_F^2 (no bias), full-batch L-BFGS in float64."""
    w = torch.zeros(num_labels, x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )

    def objective() -> torch.Tensor:
        opt.zero_grad()
        value = F.cross_entropy(x @ w.T, y) + 0.5 * lam * w.square().sum()
        value.backward()
        return value

    for _restart in range(20):  # L-BFGS may stop on a flat step before the gradient is tiny
        opt.step(objective)
        if objective() is not None and w.grad.norm() < 1e-7:
            break
    assert w.grad.norm() < 1e-7, f"the reference solve did not converge: |grad| {w.grad.norm():.1e}"
    return w.detach()


def low_rank_multiclass(
    n: int, d: int, rank: int, num_labels: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples near a `rank`-dimensional subspace of R^d, classes drawn from a planted softmax model."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=gen, dtype=torch.float64))[0]
    coords = torch.randn(n, rank, generator=gen, dtype=torch.float64)
    planted = 2 * torch.randn(num_labels, rank, generator=gen, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(coords @ planted.T, 1), 1, generator=gen).squeeze(1)
    x = coords @ basis.T + 0.01 * torch.randn(n, d, generator=gen, dtype=torch.float64)
    return x, y


def recovery_errors(lam: float) -> tuple[float, float]:
    n, d, rank, num_labels, k = 2000, 64, 2, 10, 16
    x, y = low_rank_multiclass(n, d, rank, num_labels, seed=3)
    w_star = regularised_softmax_regression(x, y, num_labels, lam)
    head = RPHead(d, split_labels(num_labels, 1, 0), k, seed=4, bias=False)
    v_star = regularised_softmax_regression(x @ head.R.double(), y, num_labels, lam)
    with torch.no_grad():
        head.weight.copy_(v_star)
    indptr, indices = torch.arange(n + 1), y
    batches = []
    for b in range(0, n, 512):  # uneven last batch on purpose
        rows = torch.arange(b, min(b + 512, n))
        b_ptr, b_ids = rows_of(indptr, indices, rows)
        batches.append((x[rows].float(), b_ptr, b_ids, torch.ones(rows.numel(), dtype=torch.bool)))
    w_rec = recover_dense_head(head, iter(batches), lam).weight.detach().double()
    rel = ((w_rec - w_star).norm() / w_star.norm()).item()
    naive = ((v_star @ head.R.double().T - w_star).norm() / w_star.norm()).item()
    print(f"lam={lam}: recovery rel. error {rel:.4f}, back-projection V* R^T rel. error {naive:.3f}")
    return rel, naive


def test_recovery_close_to_regularised_optimum():
    # Over 20 seeds of R (k = 16, rank 2) the error spans 0.012-0.066 (median 0.042) at lam = 1 and
    # 0.06-0.48 (median 0.21) at lam = 0.1: weaker regularisation means larger logits, so the JL
    # distortion of the projected problem moves its duals further. Back-projection stays at 1.6-1.9.
    rel, naive = recovery_errors(lam=1.0)
    assert rel < 0.08 and rel < naive / 15
    rel, naive = recovery_errors(lam=0.1)
    assert rel < 0.5 and rel < naive / 3


def test_recovery_follows_the_loss_gradient_for_every_kind():
    gen = torch.Generator().manual_seed(7)
    head = RPHead(12, split_labels(20, 1, 0), 4, seed=0)
    h = torch.randn(30, 12, generator=gen)
    indptr, indices = csr([[i % 20, (3 * i) % 20] for i in range(30)])
    valid = torch.arange(30) < 25
    y = dense_targets(indptr, indices, 20)
    with torch.no_grad():
        z = head(h).double()
    duals = {
        "softmax": torch.softmax(z, 1) - y / y.sum(1, keepdim=True),
        "bce": torch.sigmoid(z) - y,
        "squared_hinge": -2 * (2 * y - 1) * torch.relu(1 - (2 * y - 1) * z),
    }
    for kind, g in duals.items():
        dense = recover_dense_head(head, [(h, indptr, indices, valid)], 0.5, loss=kind)
        want = -(g[valid].T @ h[valid].double()) / (0.5 * 25)
        torch.testing.assert_close(dense.weight.double(), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(dense.bias, head.bias) and dense.label_range == head.label_range


# ---------------------------------------------------------------- recovery across ranks


def _recovery_problem(num_labels: int, d: int, k: int) -> tuple[RPHead, list[tuple]]:
    """A trained-looking slim model and global batches of 2B samples, the last one padded."""
    gen = torch.Generator().manual_seed(21)
    head = RPHead(d, split_labels(num_labels, 1, 0), k, seed=8)
    with torch.no_grad():
        head.weight.normal_(generator=gen)
        head.bias.normal_(generator=gen)
    batches = []
    for b, real in enumerate([16, 16, 11]):  # 2B = 16 samples per global batch
        h = torch.randn(16, d, generator=gen)
        labels = [torch.randint(0, num_labels, (1 + (i + b) % 3,), generator=gen).tolist() for i in range(16)]
        labels[2] = []  # a valid sample without labels
        valid = torch.arange(16) < real
        for i in range(real, 16):
            labels[i] = []
        batches.append((h, *csr(labels), valid))
    return head, batches


def _local_half(batch: tuple, part: int) -> tuple:
    h, indptr, indices, valid = batch
    rows = torch.arange(8 * part, 8 * part + 8)
    return (h[rows], *rows_of(indptr, indices, rows), valid[rows])


def _recovery_worker(rank: int, world: int, num_labels: int, d: int, k: int, lam: float) -> dict:
    from pipeline.parallel.gather_labels import gather_labels
    from pipeline.parallel.grid import build_grid
    from pipeline.parallel.model_parallel import gather_embeddings

    full, batches = _recovery_problem(num_labels, d, k)
    out = {}
    # mp = 2: each rank holds half of every global batch, gathers the group's batch, owns half the labels
    grid = build_grid(2)
    head = RPHead(d, split_labels(num_labels, 2, grid.mp_rank), k, seed=8)
    with torch.no_grad():
        head.weight.copy_(full.weight[head.label_range.start : head.label_range.stop])
        head.bias.copy_(full.bias[head.label_range.start : head.label_range.stop])

    def gathered():
        for batch in batches:
            h, indptr, indices, valid = _local_half(batch, grid.mp_rank)
            with torch.no_grad():
                h_group = gather_embeddings(h, grid.mp_group)
            yield (h_group, *gather_labels(indptr, indices, valid, grid.mp_group))

    for kind in ("softmax", "bce"):
        dense = recover_dense_head(head, gathered(), lam, grid.mp_group, grid.dp_group, loss=kind)
        out[f"mp2/{kind}"] = dense.weight.detach().numpy().copy()
    # dp = 2: two replicas of the whole label range, each sees its half of every global batch
    grid = build_grid(1)
    local = [_local_half(batch, grid.dp_rank) for batch in batches]
    for kind in ("softmax", "bce"):
        dense = recover_dense_head(full, iter(local), lam, grid.mp_group, grid.dp_group, loss=kind)
        out[f"dp2/{kind}"] = dense.weight.detach().numpy().copy()
    return out


def test_recovery_same_on_model_and_data_parallel_ranks():
    num_labels, d, k, lam = 37, 24, 6, 0.3
    ranks = run_ranks(2, _recovery_worker, num_labels, d, k, lam)
    head, batches = _recovery_problem(num_labels, d, k)
    for kind in ("softmax", "bce"):
        single = recover_dense_head(head, iter(batches), lam, loss=kind).weight.detach().numpy()
        mp2 = np.concatenate([ranks[0][f"mp2/{kind}"], ranks[1][f"mp2/{kind}"]])
        assert ranks[0][f"mp2/{kind}"].shape == (19, d)
        scale = np.abs(single).max()
        assert scale > 0.1
        np.testing.assert_allclose(mp2, single, rtol=0, atol=1e-5 * scale)
        for r in ranks:
            np.testing.assert_allclose(r[f"dp2/{kind}"], single, rtol=0, atol=1e-5 * scale)
