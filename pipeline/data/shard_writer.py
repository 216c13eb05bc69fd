"""ShardWriter: samples in, WebDataset tar shards plus manifest.json out.

Files appear atomically: a shard is written as `.shard-NNNNNN.tar.tmp` and renamed when complete, and
manifest.json (the mark of a complete set) is written last, after label_frequencies.npy and (with
`label_names`) label_names.txt. Any exception inside the `with` block removes what this run wrote,
manifest.json first (also when `finish()` had already written it: a conversion that writes two sets
in one `with` stack leaves neither when the second fails), so a failed conversion never leaves output
that looks complete.
Shards are reproducible byte for byte (fixed mtime), and their sha256 goes into the manifest.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import webdataset as wds

from pipeline.data import record
from pipeline.data.errors import DataError
from pipeline.data.manifest import (
    FREQUENCIES_NAME,
    LABEL_NAMES,
    MANIFEST_NAME,
    Manifest,
    ShardInfo,
    write_label_names,
    write_manifest,
)
from pipeline.progress import progress_bar

SHARD_PATTERN = "shard-{:06d}.tar"


class _HashingFile:
    """Write-only file that hashes what passes through (tarfile's stream mode only calls write)."""

    def __init__(self, path: Path) -> None:
        self.file = open(path, "wb")
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def close(self) -> None:
        self.file.close()


class ShardWriter:
    """Cuts samples into blocks and shards of `shard_size` samples; `finish()` writes the manifest.

    feature_kind "bow" (add_bow, add_bow_chunk), "dense" (add_dense, add_dense_chunk) or "text"
    (add_text; num_features 0). label_names: one name per label id, written as label_names.txt.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        feature_kind: str,
        num_features: int,
        num_labels: int,
        shard_size: int = 10_000,
        block_size: int = 64,
        feature_dtype: str = "float32",
        source: str = "",
        total: int | None = None,
        progress: bool = True,
        label_names: list[str] | None = None,
    ) -> None:
        if shard_size < 1 or block_size < 1:
            raise ValueError("shard_size and block_size must be positive")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"{len(label_names)} label names for num_labels={num_labels}")
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        stale_files = [self.out / MANIFEST_NAME, self.out / FREQUENCIES_NAME, self.out / LABEL_NAMES]
        for stale in [*stale_files, *self.out.glob("shard-*.tar")]:
            stale.unlink(missing_ok=True)  # a half-overwritten folder must not look complete
        self.feature_kind = feature_kind
        self.num_features, self.num_labels = num_features, num_labels
        self.shard_size, self.block_size = shard_size, block_size
        self.feature_dtype, self.source = feature_dtype, source
        self.label_names = label_names
        self.frequencies = np.zeros(num_labels, dtype=np.int64)
        self.shards: list[ShardInfo] = []
        self.written: list[Path] = []
        self.num_samples = 0
        self._file: _HashingFile | None = None
        self._tar: wds.TarWriter | None = None
        self._tmp: Path | None = None
        self._in_shard = 0
        self._pending: list[tuple[np.ndarray, ...]] = []
        self._bar = progress_bar(total, str(self.out), enabled=progress, unit=" samples", unit_scale=True)

    # -- input -------------------------------------------------------------------------------------
    def add_bow(self, labels: np.ndarray, feat_idx: np.ndarray, feat_val: np.ndarray) -> None:
        """One BoW sample (buffered into blocks)."""
        self._pending.append((labels, feat_idx, feat_val))
        if len(self._pending) >= self.block_size:
            self._flush_pending()

    def add_dense(self, labels: np.ndarray, embedding: np.ndarray) -> None:
        self._pending.append((labels, embedding))
        if len(self._pending) >= self.block_size:
            self._flush_pending()

    def add_text(self, labels: np.ndarray, text: str) -> None:
        """One raw-text sample (buffered into blocks). An empty or whitespace-only text is a DataError:
        the reader would reject it."""
        if not text.strip():
            raise DataError(
                f"empty text at sample {self.num_samples + len(self._pending)}", file=self.source or None
            )
        self._pending.append((labels, text))
        if len(self._pending) >= self.block_size:
            self._flush_pending()

    def add_bow_chunk(
        self,
        feat_indptr: np.ndarray,
        feat_idx: np.ndarray,
        feat_val: np.ndarray,
        label_indptr: np.ndarray,
        labels: np.ndarray,
    ) -> None:
        """Many BoW samples at once, CSR by sample."""
        self._flush_pending()
        n = len(label_indptr) - 1
        for lo, hi in self._cuts(n):
            f0, f1, l0, l1 = feat_indptr[lo], feat_indptr[hi], label_indptr[lo], label_indptr[hi]
            self._write_block(
                record.encode_bow(
                    self.num_samples,
                    np.diff(feat_indptr[lo : hi + 1]),
                    feat_idx[f0:f1],
                    feat_val[f0:f1],
                    np.diff(label_indptr[lo : hi + 1]),
                    labels[l0:l1],
                ),
                hi - lo,
                labels[l0:l1],
            )

    def add_dense_chunk(self, embeddings: np.ndarray, label_indptr: np.ndarray, labels: np.ndarray) -> None:
        """Many dense samples at once: embeddings [n, dim], labels CSR by sample."""
        self._flush_pending()
        for lo, hi in self._cuts(len(embeddings)):
            l0, l1 = label_indptr[lo], label_indptr[hi]
            self._write_block(
                record.encode_dense(
                    self.num_samples, embeddings[lo:hi], np.diff(label_indptr[lo : hi + 1]), labels[l0:l1]
                ),
                hi - lo,
                labels[l0:l1],
            )

    # -- output ------------------------------------------------------------------------------------
    def close_shards(self) -> None:
        """Write the buffered samples and close the last shard and the progress bar (no more samples);
        `finish()` does it too. Lets a caller end this set's progress bar before writing another."""
        self._flush_pending()
        self._close_shard()
        self._bar.close()

    def finish(self) -> Manifest:
        """Close the last shard, write label_names.txt (if any), then manifest.json; returns the manifest."""
        self.close_shards()
        if self.num_samples == 0:
            raise DataError("empty input: no samples to write", file=self.source or None)
        manifest = Manifest(
            num_samples=self.num_samples,
            num_features=self.num_features,
            num_labels=self.num_labels,
            feature_kind=self.feature_kind,  # type: ignore[arg-type]
            shards=self.shards,
            label_frequencies=self.frequencies,
            feature_dtype=self.feature_dtype,
            source=self.source,
            label_names_file=None if self.label_names is None else LABEL_NAMES,
        )
        if self.label_names is not None:
            self.written.append(write_label_names(self.out, self.label_names))
        self.written.append(self.out / FREQUENCIES_NAME)
        self.written.append(write_manifest(self.out, manifest))
        return manifest

    def abort(self) -> None:
        """Remove everything this run wrote."""
        self._bar.close()
        if self._tar is not None:
            self._file.close()
            self._tar = None
        for path in [self._tmp, *reversed(self.written)]:  # manifest.json (written last) first
            if path is not None:
                path.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()

    # -- internals ---------------------------------------------------------------------------------
    def _cuts(self, n: int):
        """(lo, hi) block ranges of the next n samples that never cross a shard boundary."""
        lo, in_shard = 0, self._in_shard
        while lo < n:
            hi = min(n, lo + self.block_size, lo + self.shard_size - in_shard)
            yield lo, hi
            in_shard = (in_shard + hi - lo) % self.shard_size
            lo = hi

    def _flush_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        labels = [np.asarray(p[0]) for p in pending]
        label_indptr = np.concatenate([[0], np.cumsum([len(x) for x in labels])])
        all_labels = np.concatenate(labels).astype(np.int64) if labels else np.empty(0, np.int64)
        if self.feature_kind == "bow":
            idx = [np.asarray(p[1]) for p in pending]
            feat_indptr = np.concatenate([[0], np.cumsum([len(x) for x in idx])])
            self.add_bow_chunk(
                feat_indptr,
                np.concatenate(idx),
                np.concatenate([p[2] for p in pending]),
                label_indptr,
                all_labels,
            )
        elif self.feature_kind == "text":
            texts = [p[1] for p in pending]
            for lo, hi in self._cuts(len(texts)):
                l0, l1 = label_indptr[lo], label_indptr[hi]
                block = record.encode_text(
                    self.num_samples, texts[lo:hi], np.diff(label_indptr[lo : hi + 1]), all_labels[l0:l1]
                )
                self._write_block(block, hi - lo, all_labels[l0:l1])
        else:
            self.add_dense_chunk(np.stack([p[1] for p in pending]), label_indptr, all_labels)

    def _write_block(self, data: bytes, n: int, labels: np.ndarray) -> None:
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
            raise DataError(
                f"label id outside [0, {self.num_labels}) near sample {self.num_samples}",
                file=self.source or None,
            )
        if self._tar is None:
            self._open_shard()
        self._tar.write({"__key__": record.block_key(self.num_samples), record.EXTENSION: data})
        np.add.at(self.frequencies, labels, 1)
        self.num_samples += n
        self._in_shard += n
        self._bar.update(n)
        if self._in_shard >= self.shard_size:
            self._close_shard()

    def _open_shard(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp = self.out / f".{name}.tmp"
        self._file = _HashingFile(self._tmp)
        self._tar = wds.TarWriter(self._file, mtime=0, user="xmc", group="xmc")
        self._in_shard = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        name = SHARD_PATTERN.format(len(self.shards))
        os.replace(self._tmp, self.out / name)
        self.written.append(self.out / name)
        self.shards.append(ShardInfo(name, self._in_shard, self._file.hash.hexdigest()))
        self._tar, self._tmp, self._in_shard = None, None, 0
