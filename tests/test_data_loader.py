"""Loader: rank/worker split, equal batch counts, padding, determinism, resume, URL sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist

from pipeline.data import convert_xmc, make_loader
from tests.multiproc import run_ranks
from tests.test_data_convert import collect, write_xmc


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """31 samples in shards of 7, 7, 7, 7, 3."""
    root = tmp_path_factory.mktemp("uneven")
    write_xmc(root / "t.txt", n=31, seed=5)
    convert_xmc(root / "t.txt", root / "out", shard_size=7, block_size=2, progress=False)
    return root / "out"


def batches(source, rank=0, world=1, **kw):
    return list(make_loader(source, kw.pop("batch_size", 4), rank, world, **kw))


def fingerprint(batch_list):
    return [
        (b.sample_ids.tolist(), b.valid.tolist(), b.feature_indices.tolist(), b.feature_weights.tolist())
        for b in batch_list
    ]


@pytest.mark.parametrize(
    "world,workers,drop_last", [(2, 2, False), (3, 1, False), (2, 2, True), (4, 2, False)]
)
def test_equal_batch_counts_and_fixed_batch_size_with_uneven_shards(uneven, world, workers, drop_last):
    lens, counts, valid = [], [], []
    for rank in range(world):
        loader = make_loader(uneven, 4, rank, world, num_workers=workers, drop_last=drop_last, seed=1)
        got = list(loader)
        lens.append(len(loader))
        counts.append(len(got))
        assert all(b.size == 4 for b in got)
        if drop_last:
            assert all(b.valid.all() for b in got)
        valid += torch.cat([b.sample_ids[b.valid] for b in got]).tolist() if got else []
    assert lens == counts and len(set(counts)) == 1
    assert len(valid) == len(set(valid))  # never twice
    if not drop_last:
        assert sorted(valid) == list(range(31))  # exactly once, padding excluded
        largest_stream = -(-31 // world)  # one stream per rank by default, whatever the workers
        assert counts[0] == -(-largest_stream // 4)


def test_fewer_samples_than_streams(tmp_path):
    write_xmc(tmp_path / "t.txt", n=3)
    convert_xmc(tmp_path / "t.txt", tmp_path / "out", progress=False)
    seen = collect(tmp_path / "out", world=2, workers=2, shuffle=False, streams=4)
    assert sorted(seen) == [0, 1, 2]
    # 4 streams over 3 samples, 2 from each per global batch of 2 x 4: rank 0 serves streams 0 (none)
    # and 1 (sample 0), so its one batch is 2 empty rows, sample 0, and a repeat of it
    (got,) = batches(tmp_path / "out", rank=0, world=2, num_workers=2, streams=4)
    assert got.valid.tolist() == [False, False, True, False]
    assert got.sample_ids.tolist() == [-1, -1, 0, 0] and got.label_indptr[:3].tolist() == [0, 0, 0]
    assert (got.feature_offsets[:3] == 0).all()


def _train_like(rank: int, world: int, source: str) -> list[int]:
    """Each rank all-reduces once per batch: a rank with fewer batches would hang the other."""
    loader = make_loader(source, 3, rank, world, num_workers=0, seed=2)  # run_ranks' processes are daemons
    ids = []
    for batch in loader:
        count = torch.tensor([batch.num_valid])
        dist.all_reduce(count)
        ids += batch.sample_ids[batch.valid].tolist()
    return ids


def test_real_ranks_do_not_hang_with_uneven_shards(uneven):
    ids = run_ranks(2, _train_like, str(uneven), timeout=90)
    assert sorted(ids[0] + ids[1]) == list(range(31))


def test_deterministic_for_a_seed_and_epoch(uneven):
    a = fingerprint(batches(uneven, num_workers=2, seed=7, epoch=1, shuffle_buffer=5))
    b = fingerprint(batches(uneven, num_workers=2, seed=7, epoch=1, shuffle_buffer=5))
    assert a == b
    other_epoch = fingerprint(batches(uneven, num_workers=2, seed=7, epoch=2, shuffle_buffer=5))
    other_seed = fingerprint(batches(uneven, num_workers=2, seed=8, epoch=1, shuffle_buffer=5))
    assert a != other_epoch and a != other_seed
    unshuffled = batches(uneven, num_workers=0, shuffle=False)
    assert torch.cat([b.sample_ids[b.valid] for b in unshuffled]).tolist() == list(range(31))


def global_batches(source, world: int, batch_size: int, workers: int, **kw) -> list[list[int]]:
    """The valid sample ids of every global batch: the ranks' batches of a step, in rank order."""
    per_rank = [
        [
            b.sample_ids[b.valid].tolist()
            for b in make_loader(source, batch_size, r, world, num_workers=workers, **kw)
        ]
        for r in range(world)
    ]
    assert len({len(p) for p in per_rank}) == 1
    return [sum((p[step] for p in per_rank), []) for step in range(len(per_rank[0]))]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_the_sample_order_does_not_depend_on_world_size_or_workers(uneven):
    """With 4 streams and a global batch of 8, 1 rank x 8, 2 x 4 and 4 x 2 see the same global batches,
    whatever the workers; each sample once, shuffled."""
    kw = dict(streams=4, seed=3, epoch=1, shuffle_buffer=5)
    one = global_batches(uneven, 1, 8, 0, **kw)
    assert global_batches(uneven, 2, 4, 2, **kw) == one
    assert global_batches(uneven, 4, 2, 3, **kw) == one
    assert sorted(sum(one, [])) == list(range(31)) and sum(one, []) != list(range(31))
    assert global_batches(uneven, 2, 4, 1, **{**kw, "streams": 2}) != one  # V is part of the order


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 2, 3])
def test_resume_from_samples_consumed(uneven, workers):
    kw = dict(num_workers=workers, seed=4, epoch=3, shuffle_buffer=6)
    full = fingerprint(batches(uneven, rank=1, world=2, batch_size=2, **kw))
    first = make_loader(uneven, 2, 1, 2, **kw)
    assert len(full) == first.batches_per_epoch
    for skip in (1, 2, 5, len(full) - 1, len(full)):
        loader = make_loader(uneven, 2, 1, 2, position=first.position_after(skip), **kw)
        assert len(loader) == len(full) - skip
        assert fingerprint(loader) == full[skip:], f"skip={skip}"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_on_another_world_size_and_batch_size(uneven):
    """A position taken on 4 ranks continues on 2 (same global batch: the same batches) and on 1 rank
    with a global batch of 12 (other batches, the same samples left, none twice)."""
    kw = dict(streams=4, seed=5, shuffle_buffer=5)
    whole = global_batches(uneven, 4, 2, 1, **kw)
    position = make_loader(uneven, 2, 0, 4, **kw).position_after(2)
    assert position == [4, 4, 4, 4]
    assert global_batches(uneven, 2, 4, 2, position=position, **kw) == whole[2:]
    rest = global_batches(uneven, 1, 12, 0, position=position, **kw)
    assert len(rest) == 2 and sorted(sum(rest, [])) == sorted(sum(whole[2:], []))


def test_streams_must_fit_the_world_and_the_global_batch(uneven):
    with pytest.raises(ValueError, match="6 data streams cannot be shared by 4 ranks"):
        make_loader(uneven, 2, 0, 4, streams=6)
    with pytest.raises(ValueError, match="global batch of 2 x 2 samples cannot take one from each of 8"):
        make_loader(uneven, 2, 0, 2, streams=8)
    with pytest.raises(ValueError, match="not a sample count for each of 2 data streams"):
        make_loader(uneven, 2, 0, 2, position=[1, 2, 3])


def test_set_epoch_restarts_from_the_first_batch(uneven):
    first = make_loader(uneven, 4, 0, 1, num_workers=0, epoch=0)
    loader = make_loader(uneven, 4, 0, 1, num_workers=0, epoch=0, position=first.position_after(3))
    assert len(list(loader)) == len(loader) == loader.batches_per_epoch - 3
    loader.set_epoch(1)
    assert fingerprint(loader) == fingerprint(batches(uneven, num_workers=0, epoch=1))


def test_batch_feeds_embedding_bag_and_multi_hot(uneven):
    batch = batches(uneven, num_workers=0, shuffle=False)[0]
    bag = torch.nn.EmbeddingBag(50, 3, mode="sum")
    out = bag(batch.feature_indices, batch.feature_offsets, per_sample_weights=batch.feature_weights)
    assert out.shape == (4, 3)
    first = bag.weight[batch.feature_indices[: batch.feature_offsets[1]]]
    expect = (first * batch.feature_weights[: batch.feature_offsets[1], None]).sum(0)
    torch.testing.assert_close(out[0], expect)
    hot = batch.multi_hot(30)
    assert hot.shape == (4, 30) and hot.sum() == len(batch.label_indices)
    for row in range(4):
        l0, l1 = batch.label_indptr[row : row + 2].tolist()
        assert set(torch.nonzero(hot[row]).flatten().tolist()) == set(batch.label_indices[l0:l1].tolist())
    assert batch.dense is None and batch.label_indices.dtype == torch.int64


def test_url_sources_brace_list_file_url_pipe_and_subset(uneven):
    folder = str(uneven)
    everything = sorted(collect(folder, world=1, workers=0, shuffle=False))
    brace = f"{folder}/shard-{{000000..000004}}.tar"
    assert sorted(collect(brace, world=2, workers=2, shuffle=False)) == everything
    assert sorted(collect(f"file://{folder}", world=1, workers=0)) == everything
    subset = sorted(collect(f"{folder}/shard-{{000001..000002}}.tar", world=2, workers=1))
    assert subset == list(range(7, 21))
    pipe = make_loader(f"pipe:cat {folder}/shard-000004.tar", 4, 0, 1, num_workers=0, manifest=folder)
    assert torch.cat([b.sample_ids[b.valid] for b in pipe]).tolist() == [28, 29, 30]


def test_shuffle_mixes_samples_within_a_rank(uneven):
    ids = torch.cat(
        [b.sample_ids[b.valid] for b in batches(uneven, num_workers=0, seed=1, shuffle_buffer=10)]
    )
    assert sorted(ids.tolist()) == list(range(31)) and ids.tolist() != list(range(31))
    assert not np.all(np.diff(ids.numpy()) > 0)
