"""Converters: XMC text / dense .npy / synthetic -> shards + manifest, and back through the loader exactly."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import (
    SyntheticTask,
    convert_dense,
    convert_xmc,
    make_loader,
    read_manifest,
    write_synthetic,
)

ROOT = Path(__file__).resolve().parent.parent


def write_xmc(path: Path, n: int = 45, num_features: int = 50, num_labels: int = 30, seed: int = 0) -> list:
    """A random XMC BoW file; returns the samples as (labels, feature ids, float32 values)."""
    rng = np.random.default_rng(seed)
    samples, lines = [], [f"{n} {num_features} {num_labels}"]
    for i in range(n):
        labels = (
            [] if i % 7 == 3 else sorted(rng.choice(num_labels, rng.integers(1, 5), replace=False).tolist())
        )
        feats = sorted(rng.choice(num_features, rng.integers(1, 9), replace=False).tolist())
        texts = [f"{v:.6g}" for v in rng.random(len(feats)) * 3]
        lines.append(
            ",".join(map(str, labels)) + " " + " ".join(f"{f}:{t}" for f, t in zip(feats, texts, strict=True))
        )
        samples.append((labels, feats, [np.float32(float(t)) for t in texts]))
    path.write_text("\n".join(lines) + "\n")
    return samples


def collect(source, world: int, workers: int, **kw) -> dict[int, tuple]:
    """Valid samples of all ranks by sample id; fails on any duplicate."""
    seen: dict[int, tuple] = {}
    for rank in range(world):
        for batch in make_loader(source, 4, rank, world, num_workers=workers, **kw):
            for row in range(batch.size):
                if not batch.valid[row]:
                    continue
                sid = int(batch.sample_ids[row])
                assert sid not in seen, f"sample {sid} delivered twice"
                l0, l1 = batch.label_indptr[row : row + 2].tolist()
                labels = batch.label_indices[l0:l1].tolist()
                if batch.dense is not None:
                    seen[sid] = (labels, batch.dense[row].numpy().copy())
                    continue
                f0 = int(batch.feature_offsets[row])
                f1 = (
                    int(batch.feature_offsets[row + 1])
                    if row + 1 < batch.size
                    else len(batch.feature_indices)
                )
                seen[sid] = (
                    labels,
                    batch.feature_indices[f0:f1].tolist(),
                    batch.feature_weights[f0:f1].numpy(),
                )
    return seen


def test_xmc_text_to_shards_to_loader_is_exact_across_2_ranks_x_2_workers(tmp_path):
    samples = write_xmc(tmp_path / "train.txt")
    manifest = convert_xmc(
        tmp_path / "train.txt", tmp_path / "out", shard_size=10, block_size=3, progress=False
    )
    assert (manifest.num_samples, manifest.num_features, manifest.num_labels) == (45, 50, 30)
    assert [s.num_samples for s in manifest.shards] == [10, 10, 10, 10, 5]
    for shuffle in (False, True):
        seen = collect(tmp_path / "out", world=2, workers=2, shuffle=shuffle, shuffle_buffer=7, seed=3)
        assert sorted(seen) == list(range(45))
        for sid, (labels, feats, values) in seen.items():
            assert labels == samples[sid][0] and feats == samples[sid][1]
            np.testing.assert_array_equal(values, np.array(samples[sid][2], dtype=np.float32))


def test_manifest_counts_frequencies_and_checksums(tmp_path):
    samples = write_xmc(tmp_path / "train.txt", n=23)
    convert_xmc(tmp_path / "train.txt", tmp_path / "out", shard_size=8, progress=False)
    m = read_manifest(tmp_path / "out")
    assert m.format_version == 1 and m.feature_kind == "bow" and m.num_samples == 23
    expected = np.bincount(np.concatenate([s[0] for s in samples]).astype(int), minlength=30)
    np.testing.assert_array_equal(m.label_frequencies, expected)
    for shard in m.shards:
        assert hashlib.sha256((tmp_path / "out" / shard.name).read_bytes()).hexdigest() == shard.sha256
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "label_frequencies.npy",
        "manifest.json",
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    # reconverting gives byte-identical shards (fixed mtime), so checksums are reproducible
    convert_xmc(tmp_path / "train.txt", tmp_path / "again", shard_size=8, progress=False)
    assert [s.sha256 for s in read_manifest(tmp_path / "again").shards] == [s.sha256 for s in m.shards]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_dense_embeddings_round_trip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((21, 6)).astype(dtype)
    np.save(tmp_path / "x.npy", emb)
    labels = [sorted(rng.choice(12, rng.integers(0, 4), replace=False).tolist()) for _ in range(21)]
    (tmp_path / "y.txt").write_text("".join(",".join(map(str, ls)) + "\n" for ls in labels))
    m = convert_dense(tmp_path / "x.npy", tmp_path / "y.txt", tmp_path / "out", shard_size=5, progress=False)
    assert (m.feature_kind, m.num_features, m.feature_dtype) == ("dense", 6, np.dtype(dtype).name)
    assert m.num_labels == max(max(ls) for ls in labels if ls) + 1
    seen = collect(tmp_path / "out", world=2, workers=2, shuffle=False)
    assert sorted(seen) == list(range(21))
    for sid, (got_labels, row) in seen.items():
        assert got_labels == labels[sid]
        assert row.dtype == np.float32
        np.testing.assert_array_equal(row, emb[sid].astype(np.float32))


def test_synthetic_matches_the_brief(tmp_path):
    task = SyntheticTask(num_features=20_000, num_labels=30_000, seed=0)
    chunks = list(task.samples(20_000, stream=0))
    labels_per = np.concatenate([np.diff(c.label_indptr) for c in chunks])
    feats_per = np.concatenate([np.diff(c.feat_indptr) for c in chunks])
    assert 4.5 < labels_per.mean() < 5.5 and labels_per.min() >= 1
    assert 65 < feats_per.mean() < 85
    freq = np.bincount(np.concatenate([c.labels for c in chunks]), minlength=30_000)
    assert (freq < 5).mean() > 0.5  # most labels are rare ...
    assert freq.max() > 50 * freq.mean()  # ... and a few are very frequent (power law)
    # planted structure: a sample's features mostly come from its labels' signatures
    c = chunks[0]
    hits = []
    for i in range(200):
        own = set(task._signatures[c.labels[c.label_indptr[i] : c.label_indptr[i + 1]]].ravel().tolist())
        feats = c.feat_idx[c.feat_indptr[i] : c.feat_indptr[i + 1]]
        hits.append(np.isin(feats, list(own)).mean())
    assert np.mean(hits) > 0.4  # vs ~0.004 for random features
    values = c.feat_val[c.feat_indptr[0] : c.feat_indptr[1]]
    assert np.isclose(np.linalg.norm(values), 1.0, atol=1e-5) and (values > 0).all()
    # deterministic per seed and split; test split differs from train
    first = next(task.samples(300, stream=0))
    again = next(SyntheticTask(num_features=20_000, num_labels=30_000, seed=0).samples(300, stream=0))
    np.testing.assert_array_equal(again.labels, first.labels)
    np.testing.assert_array_equal(again.feat_val, first.feat_val)
    test = next(task.samples(300, stream=1))
    assert not np.array_equal(test.labels[:50], again.labels[:50])


def test_synthetic_train_and_test_folders(tmp_path):
    ms = write_synthetic(
        tmp_path, num_train=300, num_test=50, num_features=500, num_labels=200, shard_size=128, progress=False
    )
    assert ms["train"].num_samples == 300 and len(ms["train"].shards) == 3
    assert read_manifest(tmp_path / "test").num_samples == 50
    assert ms["train"].label_frequencies.sum() > 300


def test_prepare_data_cli(tmp_path):
    out = tmp_path / "demo"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch/prepare_data.py"),
            "synthetic",
            "--out",
            str(out),
            "--num-train",
            "200",
            "--num-test",
            "20",
            "--num-features",
            "300",
            "--num-labels",
            "100",
            "--seed",
            "0",
            "--shard-size",
            "64",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert read_manifest(out / "train").num_samples == 200 and len(read_manifest(out / "train").shards) == 4
    assert (out / "test" / "manifest.json").exists()
    write_xmc(tmp_path / "t.txt", n=12)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.data",
            "xmc",
            "--input",
            str(tmp_path / "t.txt"),
            "--out",
            str(tmp_path / "x"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert "12 samples" in run.stdout
