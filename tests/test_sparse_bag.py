"""The sparse bag-of-words table: row exchange, lazy Adam, the training step and checkpoints.

References are plain single-process computations: a dense sum of every rank's rows divided by the
world size for the exchange; one `torch.optim.Adam` per row, stepped when the row is touched, for the
lazy Adam (the semantics `pipeline/models/sparse_bag.py` documents); the dense path (the table inside
the DeepSpeed engine) for the training step. Multi-rank tests run real gloo processes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.models.backbones import BowBackbone
from pipeline.models.sparse_bag import SparseBag, lazy_adam_, lazy_adam_gathered_
from pipeline.parallel.sparse_rows import average_rows
from tests.multiproc import run_ranks

WIDTH = 6


def by_value(obj: Any, back: bool = False) -> Any:
    """Tensors (nested in dicts, lists, tuples) as numpy arrays, or back to tensors: results cross the
    process boundary by value, not as torch's shared-memory handles, which need the sending process
    alive until the parent has read them."""
    if isinstance(obj, dict):
        return {k: by_value(v, back) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(by_value(v, back) for v in obj)
    if back and isinstance(obj, np.ndarray):
        return torch.from_numpy(obj)
    return obj.numpy() if isinstance(obj, torch.Tensor) else obj


def ranks(world: int, fn, *args: Any, timeout: float = 120.0) -> list[Any]:
    """`run_ranks` of a worker whose results pass through `by_value`."""
    return by_value(run_ranks(world, fn, *args, timeout=timeout), back=True)


# ----- the exchange -------------------------------------------------------------------------------


def exchange_inputs(case: str, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (ids, rows) of one case, a function of (case, rank, world) alone."""
    g = torch.Generator().manual_seed(1000 * world + 10 * rank + len(case))
    if case == "overlapping":  # shared ids 3..8, some of each rank's own; repeats within a rank
        ids = torch.cat([torch.arange(3, 9), torch.tensor([20 + rank, 5, 3])])
    elif case == "disjoint":
        ids = torch.arange(4) + 10 * rank
    elif case == "one_empty":  # the last rank has no ids at all
        ids = torch.tensor([], dtype=torch.int64) if rank == world - 1 else torch.tensor([7, 1, 30 + rank])
    else:
        raise ValueError(case)
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    return ids, torch.randn(ids.numel(), WIDTH, generator=g)


CASES = ("overlapping", "disjoint", "one_empty")


def exchange_worker(rank: int, world: int) -> dict:
    return by_value({case: average_rows(*exchange_inputs(case, rank, world)) for case in CASES})


@pytest.mark.parametrize("world", [2, 3])
def test_exchange_equals_the_dense_average(world):
    results = ranks(world, exchange_worker)
    for case in CASES:
        inputs = [exchange_inputs(case, r, world) for r in range(world)]
        dense = torch.zeros(64, WIDTH, dtype=torch.float64)
        for ids, rows in inputs:
            dense.index_add_(0, ids, rows.double())
        dense /= world
        touched = torch.unique(torch.cat([ids for ids, _ in inputs]))
        ids, rows = results[0][case]
        assert torch.equal(ids, touched), case
        torch.testing.assert_close(rows.double(), dense[touched], rtol=1e-6, atol=1e-7)
        for other in results[1:]:  # bit-identical on every rank: the replicas stay equal
            assert torch.equal(other[case][0], ids) and torch.equal(other[case][1], rows), case


def empty_worker(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return by_value(average_rows(torch.tensor([], dtype=torch.int64), torch.zeros(0, WIDTH)))


def test_exchange_with_no_rows_anywhere():
    for ids, rows in ranks(2, empty_worker):
        assert ids.numel() == 0 and rows.shape == (0, WIDTH)


# ----- the table module ---------------------------------------------------------------------------


def bow_batch(
    g: torch.Generator, num_features: int, rows: int, per_row: int, pool: torch.Tensor | None = None
):
    """(indices, offsets, weights) of `rows` bags of 1..per_row ids; with `pool` the ids are drawn from
    it and each of its ids occurs at least once (bags of at least 3 ids: rows x 3 >= len(pool))."""
    counts = torch.randint(1 if pool is None else 3, per_row + 1, (rows,), generator=g)
    n = int(counts.sum())
    if pool is None:
        indices = torch.randint(0, num_features, (n,), generator=g)
    else:
        indices = pool[torch.randint(0, pool.numel(), (n,), generator=g)]
        indices[: pool.numel()] = pool[torch.randperm(pool.numel(), generator=g)]  # every pool id once
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)[:-1]])
    return indices, offsets, torch.rand(n, generator=g)


def test_table_forward_and_gradient_rows_equal_the_embedding_bag():
    torch.manual_seed(0)
    dense = BowBackbone(40, 8, [WIDTH])
    sparse = BowBackbone(40, 8, [WIDTH])
    sparse.load_state_dict(dense.state_dict())
    bag = SparseBag.take_from(sparse)
    assert "bag.weight" not in dict(sparse.named_parameters()) and "bag.weight" not in sparse.state_dict()
    indices, offsets, weights = bow_batch(torch.Generator().manual_seed(1), 40, 7, 5)
    target = torch.randn(7, 8)
    ((dense(indices, offsets, weights) - target) ** 2).sum().backward()
    ((sparse(indices, offsets, weights) - target) ** 2).sum().backward()
    ids, rows = bag.local_gradient()
    assert torch.equal(ids, torch.unique(indices))
    torch.testing.assert_close(rows, dense.bag.weight.grad[ids], rtol=1e-6, atol=1e-7)
    untouched = torch.ones(40, dtype=torch.bool)
    untouched[ids] = False
    assert torch.equal(dense.bag.weight.grad[untouched], torch.zeros(int(untouched.sum()), WIDTH))
    for p, q in zip(dense.mlp.parameters(), sparse.mlp.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # the evaluation path reads the table itself, and records nothing
        torch.testing.assert_close(sparse(indices, offsets, weights), dense(indices, offsets, weights))
    assert bag.local_gradient()[0].numel() == 0


# ----- lazy Adam ----------------------------------------------------------------------------------


LAZY_ADAMS = {
    "in_place": lazy_adam_,
    "gathered": lazy_adam_gathered_,
}  # the CPU kernel, the other devices' path


@pytest.mark.parametrize("variant", LAZY_ADAMS)
def test_lazy_adam_equals_one_torch_adam_per_row(variant):
    """k steps on random row subsets (some rows never touched) at a changing learning rate: every row
    equals its own torch Adam stepped when touched; untouched rows and their state are bit-unchanged.
    Both implementations: the in-place C++ pass (CPU, float32) and the gathered fused-Adam call."""
    lazy = LAZY_ADAMS[variant]
    g = torch.Generator().manual_seed(2)
    num_rows, steps = 12, 7
    initial = torch.randn(num_rows, WIDTH, generator=g)
    weight, m, v = initial.clone(), torch.zeros_like(initial), torch.zeros_like(initial)
    row_steps = torch.zeros(num_rows, dtype=torch.int64)
    params = [torch.nn.Parameter(initial[i].clone()) for i in range(num_rows)]
    optimizers = [torch.optim.Adam([p], lr=1.0, fused=True) for p in params]
    never = {10, 11}
    for k in range(steps):
        lr = 1e-2 * (k + 1) / steps
        candidates = torch.tensor([i for i in range(num_rows) if i not in never])
        ids = candidates[torch.randperm(candidates.numel(), generator=g)[:5]].sort().values
        grads = torch.randn(ids.numel(), WIDTH, generator=g) * 10.0 ** -float(k % 3)
        lazy(weight, m, v, row_steps, ids, grads, lr)
        for i, row in zip(ids.tolist(), grads, strict=True):
            params[i].grad = row.clone()
            optimizers[i].param_groups[0]["lr"] = lr
            optimizers[i].step()
    reference = torch.stack([p.detach() for p in params])
    torch.testing.assert_close(weight, reference, rtol=1e-6, atol=1e-7)
    for i in range(num_rows):
        state = optimizers[i].state.get(params[i], {})
        assert int(row_steps[i]) == int(state.get("step", 0))
        if state:
            torch.testing.assert_close(m[i], state["exp_avg"], rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(v[i], state["exp_avg_sq"], rtol=1e-6, atol=1e-12)
    for i in never:
        assert torch.equal(weight[i], initial[i]) and not m[i].any() and not v[i].any()


@pytest.mark.parametrize("variant", LAZY_ADAMS)
def test_lazy_adam_touching_every_row_equals_the_dense_fused_adam(variant):
    """When every row is touched at every step, lazy Adam is the dense path's optimizer."""
    g = torch.Generator().manual_seed(3)
    initial = torch.randn(9, WIDTH, generator=g)
    weight, m, v = initial.clone(), torch.zeros_like(initial), torch.zeros_like(initial)
    row_steps = torch.zeros(9, dtype=torch.int64)
    dense = torch.nn.Parameter(initial.clone())
    optimizer = torch.optim.Adam([dense], lr=3e-3, fused=True)
    for _ in range(5):
        grads = torch.randn(9, WIDTH, generator=g)
        LAZY_ADAMS[variant](weight, m, v, row_steps, torch.arange(9), grads, 3e-3)
        dense.grad = grads.clone()
        optimizer.step()
    torch.testing.assert_close(weight, dense.detach(), rtol=1e-6, atol=1e-7)


# ----- a training step against the dense DeepSpeed path -------------------------------------------


NUM_FEATURES, EMBED, BATCH = 50, 8, 5


def build_engine(sparse: bool, seed: int = 0):
    """BowBackbone (bag width WIDTH) under a ZeRO-1 DeepSpeed engine built as the trainer builds it, with
    the table in a SparseBag when `sparse`; returns (engine, bag or None, backbone lr, schedule)."""
    import deepspeed

    from pipeline.config import RunConfig
    from pipeline.train.loop import backbone_optimizer, backbone_param_groups, deepspeed_config, lr_factor

    config = RunConfig.model_validate(
        {
            "data": {"batch_size": BATCH},
            "deepspeed": {"zero_optimization": {"stage": 1}, "gradient_clipping": 0.0},
            "train": {"lr": 1e-2, "backbone_lr": 5e-3, "warmup_steps": 3, "steps": 10},
        }
    )
    torch.manual_seed(seed)
    backbone = BowBackbone(NUM_FEATURES, EMBED, [WIDTH])
    bag = SparseBag.take_from(backbone) if sparse else None
    ds = deepspeed_config(config, torch.distributed.get_world_size())
    groups, factors = backbone_param_groups(backbone, config.train, 10)
    optimizer = backbone_optimizer(groups, ds)
    engine, _, _, _ = deepspeed.initialize(
        model=backbone,
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, factors),
        config=ds,
    )
    return engine, bag, config.train.backbone_lr, lambda step: lr_factor(step, 3, 10)


def train_step(engine, bag, lr: float, schedule, step: int, batch, target: torch.Tensor) -> None:
    """The trainer's order: forward, engine.backward, engine.step, then the table's step."""
    loss = ((engine(*batch) - target) ** 2).mean()
    engine.backward(loss)
    engine.step()
    if bag is not None:
        bag.step(lr * schedule(step))


def full_state(engine, bag) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if bag is not None:
        state["bag.weight"] = bag.weight.clone()
    return state


def start_deepspeed(rank: int, world: int) -> None:
    from pipeline.parallel.distributed import init_distributed

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    init_distributed()  # DeepSpeed's communication over the gloo group multiproc started


def step_worker(rank: int, world: int) -> dict:
    """Scenario 'first': one step on random batches. Scenario 'fixed': 3 steps whose batches touch the
    same ids every step (so dense Adam and lazy Adam coincide on every row). Returns both paths'
    parameters after each step."""
    start_deepspeed(rank, world)
    out = {}
    pools = {"first": None, "fixed": torch.arange(4 * rank, 4 * rank + 12)}  # overlapping pools
    for scenario, steps in (("first", 1), ("fixed", 3)):
        g = torch.Generator().manual_seed(100 + rank)
        batches = [bow_batch(g, NUM_FEATURES, BATCH, 6, pools[scenario]) for _ in range(steps)]
        targets = [torch.randn(BATCH, EMBED, generator=g) for _ in range(steps)]
        for sparse in (False, True):
            engine, bag, lr, schedule = build_engine(sparse)
            before = full_state(engine, bag)
            states = []
            for step in range(steps):
                train_step(engine, bag, lr, schedule, step, batches[step], targets[step])
                states.append(full_state(engine, bag))
            out[f"{scenario} {sparse}"] = (before, states, [b[0] for b in batches])
    return by_value(out)


def test_two_rank_step_equals_the_dense_deepspeed_step():
    results = ranks(2, step_worker, timeout=300)
    for scenario in ("first", "fixed"):
        for rank_result in results:
            dense_before, dense, indices = rank_result[f"{scenario} False"]
            sparse_before, sparse, _ = rank_result[f"{scenario} True"]
            assert all(torch.equal(dense_before[k], sparse_before[k]) for k in dense_before)
            touched = torch.unique(torch.cat([r[f"{scenario} False"][2][0] for r in results]))
            for d, s in zip(dense, sparse, strict=True):
                assert set(d) == set(s)
                for key in d:
                    torch.testing.assert_close(s[key], d[key], rtol=0, atol=1e-6, msg=f"{scenario} {key}")
            moved = (sparse[-1]["bag.weight"] != sparse_before["bag.weight"]).any(1)
            moved_dense = (dense[-1]["bag.weight"] != dense_before["bag.weight"]).any(1)
            untouched = torch.ones(NUM_FEATURES, dtype=torch.bool)
            untouched[touched] = False
            assert moved[touched].any() and not moved[untouched].any()  # untouched rows bit-unchanged
            assert torch.equal(moved, moved_dense)  # (a touched row whose gradient is 0 stays in both)
        assert all(
            torch.equal(results[0][f"{scenario} True"][1][-1][k], results[1][f"{scenario} True"][1][-1][k])
            for k in results[0][f"{scenario} True"][1][-1]
        )  # the replicas are identical


# ----- checkpoints --------------------------------------------------------------------------------


def checkpoint_worker(rank: int, world: int, root: str) -> dict:
    """2 steps, checkpoint, step 3; a fresh engine and table (another seed) restored from the
    checkpoint, step 3 again. Also backbone.pt into a plain backbone, and a refused mismatch."""
    from pipeline.parallel.grid import build_grid
    from pipeline.train import checkpoint as ckpt

    start_deepspeed(rank, world)
    grid = build_grid(1)
    g = torch.Generator().manual_seed(7 + rank)
    batches = [bow_batch(g, NUM_FEATURES, BATCH, 6) for _ in range(3)]
    targets = [torch.randn(BATCH, EMBED, generator=g) for _ in range(3)]
    engine, bag, lr, schedule = build_engine(True)
    for step in range(2):
        train_step(engine, bag, lr, schedule, step, batches[step], targets[step])
    path = ckpt.write_checkpoint(Path(root), 2, grid, ckpt.engine_backbone(engine, bag), {}, {})
    at_checkpoint = full_state(engine, bag), {k: v.clone() for k, v in bag.state_dict().items()}
    with torch.no_grad():
        embedded = engine.module(*batches[0])
    train_step(engine, bag, lr, schedule, 2, batches[2], targets[2])
    uninterrupted = full_state(engine, bag), {k: v.clone() for k, v in bag.state_dict().items()}

    engine2, bag2, _, _ = build_engine(True, seed=1)
    ckpt.load_backbone_engine(engine2, path, bag2)
    restored = full_state(engine2, bag2), {k: v.clone() for k, v in bag2.state_dict().items()}
    train_step(engine2, bag2, lr, schedule, 2, batches[2], targets[2])
    resumed = full_state(engine2, bag2), {k: v.clone() for k, v in bag2.state_dict().items()}

    plain = BowBackbone(NUM_FEATURES, EMBED, [WIDTH])
    weights = torch.load(path / "backbone.pt", weights_only=True)
    plain.load_state_dict(weights)
    with torch.no_grad():
        predicted = plain(*batches[0])
    with pytest.raises(
        ckpt.CheckpointError, match="model.sparse_bag=true, this run has model.sparse_bag=false"
    ):
        ckpt.load_backbone_engine(engine2, path, None)
    return by_value(
        {
            "at_checkpoint": at_checkpoint,
            "restored": restored,
            "uninterrupted": uninterrupted,
            "resumed": resumed,
            "embedded": embedded,
            "predicted": predicted,
            "keys": list(weights),
            "files": sorted(p.name for p in path.iterdir()),
        }
    )


def test_checkpoint_round_trip(tmp_path):
    results = ranks(2, checkpoint_worker, str(tmp_path), timeout=300)
    for r in results:
        assert r["keys"] == ["bag.weight", "bag_bias", "mlp.0.weight", "mlp.0.bias"]
        assert {"backbone", "backbone.pt", "sparse_bag.pt", "meta.json"} <= set(r["files"])
        for got, want in ((r["restored"], r["at_checkpoint"]), (r["resumed"], r["uninterrupted"])):
            for part in range(2):  # full parameters; the table's buffers (weight, moments, row steps)
                assert set(got[part]) == set(want[part])
                assert all(torch.equal(got[part][k], want[part][k]) for k in want[part])
        assert torch.equal(r["predicted"], r["embedded"])  # backbone.pt predicts as the trained model
