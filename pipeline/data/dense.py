"""Dense-embedding source: an `.npy` matrix [N, d] (float32 or float16, memory-mapped) plus a label file.

The label file has one line per sample with comma-separated label ids (an empty line = no labels),
so it lines up with the matrix rows. The matrix is read in row chunks through a memory map, so
memory stays bounded; float16 stays float16 in the shards (half the size) and becomes float32 in
the loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from pipeline.data.errors import DataError


def open_embeddings(path: str | os.PathLike) -> np.ndarray:
    """Memory-map the matrix and check its shape and dtype."""
    path = str(path)
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read as .npy: {exn}", file=path) from None
    if emb.ndim != 2:
        raise DataError(f"expected a 2-d matrix [num_samples, dim], got shape {emb.shape}", file=path)
    if emb.dtype not in (np.float32, np.float16):
        raise DataError(f"expected float32 or float16, got {emb.dtype}", file=path)
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise DataError(f"empty input: shape {emb.shape}", file=path)
    return emb


def scan_labels(path: str | os.PathLike) -> tuple[int, int]:
    """(number of lines, largest label id + 1) of a label file, checking every line's syntax."""
    lines, top = 0, 0
    for _lineno, labels in iter_labels(path):
        lines += 1
        if labels.size:
            top = max(top, int(labels.max()) + 1)
    return lines, top


def iter_labels(path: str | os.PathLike, num_labels: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(line number, label ids) per line; DataError at `file:line` for anything malformed."""
    path = str(path)
    try:
        file = open(path, encoding="utf-8")
    except OSError as exn:
        raise DataError(f"cannot read: {exn}", file=path) from None
    with file:
        lineno = 0
        try:
            for lineno, text in enumerate(file, start=1):
                text = text.strip()
                try:
                    labels = np.array(text.split(","), dtype=np.int64) if text else np.empty(0, np.int64)
                except ValueError:
                    raise DataError(
                        f"malformed label list {text!r}: expected comma-separated integers",
                        file=path,
                        line=lineno,
                    ) from None
                if labels.size and labels.min() < 0:
                    raise DataError(f"negative label id {labels.min()}", file=path, line=lineno)
                if num_labels is not None and labels.size and labels.max() >= num_labels:
                    raise DataError(
                        f"label id {labels.max()} not in [0, {num_labels})", file=path, line=lineno
                    )
                yield lineno, labels
        except UnicodeDecodeError as exn:
            raise DataError(f"not UTF-8 text: {exn}", file=path, line=lineno + 1) from None


def iter_dense(
    emb_path: str | os.PathLike, labels_path: str | os.PathLike, num_labels: int, chunk: int = 4096
) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """(embeddings chunk, label arrays) of up to `chunk` rows; checks finiteness and line counts."""
    emb = open_embeddings(emb_path)
    labels_iter = iter_labels(labels_path, num_labels)
    for lo in range(0, emb.shape[0], chunk):
        rows = np.asarray(emb[lo : lo + chunk])
        finite = np.isfinite(rows).all(axis=1)
        if not finite.all():
            bad = lo + int(np.flatnonzero(~finite)[0])
            raise DataError(f"row {bad} has NaN or Inf values", file=str(emb_path))
        labels = []
        for _ in range(len(rows)):
            item = next(labels_iter, None)
            if item is None:
                raise DataError(
                    f"label file ends before the matrix's {emb.shape[0]} rows",
                    file=str(labels_path),
                    line=lo + len(labels) + 1,
                )
            labels.append(item[1])
        yield rows, labels
    extra = next(labels_iter, None)
    if extra is not None:
        raise DataError(
            f"label file has more lines than the matrix's {emb.shape[0]} rows",
            file=str(labels_path),
            line=extra[0],
        )
