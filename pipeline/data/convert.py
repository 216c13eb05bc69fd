"""The conversions: source (XMC BoW text, dense .npy, raw-text JSON lines) -> ShardWriter -> folder
of shards + manifest.json; and the synthetic set a run config asks for, generated when it is not there
yet."""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from pipeline.data.dense import iter_dense, open_embeddings, scan_labels
from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest
from pipeline.data.shard_writer import ShardWriter
from pipeline.data.synthetic import SyntheticTask
from pipeline.data.text_source import TextSource, read_names_file
from pipeline.data.xmc_text import XMCTextReader


def convert_xmc(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 10_000,
    block_size: int = 64,
    progress: bool = True,
) -> Manifest:
    """XMC-repository BoW text file (optionally .gz) -> shards; streams line by line."""
    with XMCTextReader(input_path) as reader:
        with ShardWriter(
            out_dir,
            feature_kind="bow",
            num_features=reader.num_features,
            num_labels=reader.num_labels,
            shard_size=shard_size,
            block_size=block_size,
            source=str(input_path),
            total=reader.num_samples,
            progress=progress,
        ) as writer:
            for labels, idx, values in reader:
                writer.add_bow(labels, idx, values)
            return writer.finish()


def convert_dense(
    embeddings: str | os.PathLike,
    labels: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    num_labels: int | None = None,
    shard_size: int = 10_000,
    block_size: int = 64,
    progress: bool = True,
) -> Manifest:
    """`.npy` [N, d] float32/float16 + label file -> shards. num_labels defaults to max label id + 1."""
    emb = open_embeddings(embeddings)
    lines, top = scan_labels(labels)
    if lines != emb.shape[0]:
        raise DataError(
            f"label file has {lines} lines but {embeddings} has {emb.shape[0]} rows",
            file=str(labels),
            line=lines,
        )
    if num_labels is None:
        if top == 0:
            raise DataError("no label ids in the file: pass num_labels", file=str(labels))
        num_labels = top
    with ShardWriter(
        out_dir,
        feature_kind="dense",
        num_features=emb.shape[1],
        num_labels=num_labels,
        shard_size=shard_size,
        block_size=block_size,
        feature_dtype=str(emb.dtype),
        source=f"{embeddings} + {labels}",
        total=emb.shape[0],
        progress=progress,
    ) as writer:
        for rows, label_lists in iter_dense(embeddings, labels, num_labels):
            label_indptr = np.concatenate([[0], np.cumsum([len(x) for x in label_lists])])
            writer.add_dense_chunk(rows, label_indptr, np.concatenate(label_lists).astype(np.int64))
        return writer.finish()


def convert_text(
    train_input: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    test_input: str | os.PathLike | None = None,
    num_labels: int | None = None,
    label_names_file: str | os.PathLike | None = None,
    shard_size: int = 10_000,
    block_size: int = 64,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Raw-text JSON lines (see text_source; .gz accepted) -> `out_dir/train` and, with `test_input`,
    `out_dir/test` (the layout of write_synthetic), feature_kind "text".

    Label names (strings): one vocabulary from the training file, sorted by code point (reproducible:
    independent of the file's order, the same ids for the same label set), saved as label_names.txt
    beside both manifests; a test label outside it is an error at its file and line. Label ids
    (integers): num_labels = `num_labels`, else the number of names in `label_names_file`, else the
    largest training id + 1; test ids must be below it; `label_names_file` (one name per line, line i =
    id i) is copied beside both manifests.

    Two passes over the training file (labels and count, then writing), one over the test file. Both
    sets are written inside one `with` stack: any error, in either file, leaves neither manifest.
    """
    train_path = str(train_input)
    names = read_names_file(label_names_file) if label_names_file is not None else None
    limit = num_labels if num_labels is not None else (len(names) if names is not None else None)
    if names is not None and num_labels is not None and len(names) != num_labels:
        raise DataError(f"{len(names)} label names but num_labels={num_labels}", file=str(label_names_file))
    if limit is not None and limit < 1:
        raise DataError(f"num_labels must be positive, got {limit}", file=train_path)
    train = TextSource(train_path)
    count, top, seen = 0, 0, set()
    for row in train:
        count += 1
        if row.labels and train.label_kind == "names":
            seen.update(row.labels)
        elif row.labels:
            top = max(top, max(row.labels) + 1)
            if limit is not None:
                train.ids(row, limit)
    if count == 0:
        raise DataError("empty input: no samples", file=train_path)
    vocabulary = None
    if train.label_kind == "names":
        if limit is not None:
            raise DataError(
                "the labels are names: their vocabulary comes from this file (num_labels and a label "
                "names file apply to integer label ids only)",
                file=train_path,
            )
        names = sorted(seen)
        vocabulary = {name: i for i, name in enumerate(names)}
        limit = len(names)
    elif limit is None:
        if top == 0:
            raise DataError("no label ids in the file: pass num_labels", file=train_path)
        limit = top
    kind = train.label_kind or "ids"
    opts = dict(
        feature_kind="text",
        num_features=0,
        num_labels=limit,
        shard_size=shard_size,
        block_size=block_size,
        progress=progress,
        label_names=names,
    )
    splits = [("train", train_path, count)]
    if test_input is not None:
        splits.append(("test", str(test_input), None))
    with ExitStack() as stack:
        writers = []
        for split, path, total in splits:
            writer = stack.enter_context(ShardWriter(Path(out_dir) / split, source=path, total=total, **opts))
            source = TextSource(path, label_kind=kind, kind_from=None if split == "train" else train_path)
            for row in source:
                writer.add_text(source.ids(row, limit, vocabulary), row.text)
            writer.close_shards()
            writers.append((split, writer))
        return {split: writer.finish() for split, writer in writers}


def write_synthetic(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_test: int,
    num_features: int,
    num_labels: int,
    seed: int = 0,
    shard_size: int = 10_000,
    block_size: int = 64,
    progress: bool = True,
) -> dict[str, Manifest]:
    """`out_dir/train` and `out_dir/test`, drawn from one SyntheticTask (same distribution)."""
    task = SyntheticTask(num_features=num_features, num_labels=num_labels, seed=seed)
    manifests = {}
    for stream, (split, n) in enumerate((("train", num_train), ("test", num_test))):
        source = f"synthetic seed={seed} split={split}"
        with ShardWriter(
            Path(out_dir) / split,
            feature_kind="bow",
            num_features=num_features,
            num_labels=num_labels,
            shard_size=shard_size,
            block_size=block_size,
            source=source,
            total=n,
            progress=progress,
        ) as writer:
            for chunk in task.samples(n, stream):
                writer.add_bow_chunk(
                    chunk.feat_indptr, chunk.feat_idx, chunk.feat_val, chunk.label_indptr, chunk.labels
                )
            manifests[split] = writer.finish()
    return manifests


def ensure_synthetic(train: str | os.PathLike, spec) -> bool:
    """Generate the synthetic set `spec` (a config's `data.synthetic`: num_train, num_test,
    num_features, num_labels, seed) into the parent of `train` when `train` holds no manifest; returns
    whether it generated. The generator writes `<parent>/train` and `<parent>/test` (the caller checks
    that the config's test set is that sibling). Shards and manifests are written under temporary
    names and renamed when complete, so an interrupted generation is redone, never half used."""
    train = Path(train)
    if (train / "manifest.json").is_file() or spec is None:
        return False  # the loader reports a missing or bad data set itself
    print(f"generating the synthetic data set in {train.parent} ({spec.num_train} + {spec.num_test} samples)")
    write_synthetic(
        train.parent,
        num_train=spec.num_train,
        num_test=spec.num_test,
        num_features=spec.num_features,
        num_labels=spec.num_labels,
        seed=spec.seed,
        shard_size=max(1000, -(-spec.num_train // 16)),
    )
    return True
