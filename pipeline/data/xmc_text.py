"""Streaming reader of the Extreme Classification Repository's BoW text format.

    num_points num_features num_labels
    l1,l2,...  f1:v1 f2:v2 ...        (labels may be empty; features 0-based `index:value`)

One line in memory at a time, so a multi-GB file converts in bounded memory. Every problem is a
DataError at `file:line`: we would rather stop than train on a silently mangled sample.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator
from typing import IO

import numpy as np

from pipeline.data.errors import DataError


def _open(path: str) -> IO[str]:
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


class XMCTextReader:
    """Header on construction, samples `(labels, feature ids, values)` on iteration (numpy arrays)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = str(path)
        try:
            self._file = _open(self.path)
            header = self._file.readline()
        except (OSError, UnicodeDecodeError) as exn:
            raise DataError(f"cannot read: {exn}", file=self.path) from None
        if not header.strip():
            raise DataError(
                "empty input: expected a header line 'num_points num_features num_labels'",
                file=self.path,
                line=1,
            )
        fields = header.split()
        try:
            values = [int(x) for x in fields]
        except ValueError:
            values = []
        if len(values) != 3 or min(values) < 0:
            raise DataError(
                f"bad header {header.strip()!r}: expected 'num_points num_features num_labels'",
                file=self.path,
                line=1,
            )
        self.num_samples, self.num_features, self.num_labels = values
        if self.num_samples == 0 or self.num_features == 0 or self.num_labels == 0:
            raise DataError(
                f"empty input: header {header.strip()!r} declares no samples, features or labels",
                file=self.path,
                line=1,
            )

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> XMCTextReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        count = 0
        lineno = 1
        trailing_blank = None
        try:
            for lineno, text in enumerate(self._file, start=2):
                if not text.strip():
                    trailing_blank = trailing_blank or lineno
                    continue
                if trailing_blank is not None:
                    raise DataError("blank line inside the data", file=self.path, line=trailing_blank)
                count += 1
                if count > self.num_samples:
                    raise DataError(
                        f"more samples than the header's num_points={self.num_samples}",
                        file=self.path,
                        line=lineno,
                    )
                yield self._parse(text, lineno)
        except UnicodeDecodeError as exn:
            raise DataError(f"not UTF-8 text: {exn}", file=self.path, line=lineno + 1) from None
        if count != self.num_samples:
            raise DataError(
                f"header says num_points={self.num_samples} but the file has {count} samples",
                file=self.path,
                line=lineno,
            )

    def _parse(self, text: str, lineno: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = text.split()
        if ":" in tokens[0]:
            label_text, feats = "", tokens
        else:
            label_text, feats = tokens[0], tokens[1:]

        def fail(message: str) -> DataError:
            return DataError(message, file=self.path, line=lineno)

        try:
            labels = np.array(label_text.split(","), dtype=np.int64) if label_text else np.empty(0, np.int64)
        except ValueError:
            raise fail(f"malformed label list {label_text!r}: expected comma-separated integers") from None
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_labels):
            bad = labels[(labels < 0) | (labels >= self.num_labels)][0]
            raise fail(f"label id {bad} not in [0, {self.num_labels})")
        joined = " ".join(feats)
        pairs = None
        if joined.count(":") == len(feats):
            try:
                pairs = np.array(joined.replace(":", " ").split(), dtype=np.float64)
            except ValueError:
                pairs = None
        if pairs is None or pairs.size != 2 * len(feats):
            bad = next((f for f in feats if not _is_feature(f)), feats[0] if feats else "")
            raise fail(f"malformed feature {bad!r}: expected index:value")
        idx, values = pairs[0::2], pairs[1::2]
        if idx.size and not np.array_equal(idx, np.floor(idx)):
            raise fail(f"feature index {idx[idx != np.floor(idx)][0]} is not an integer")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_features):
            bad = idx[(idx < 0) | (idx >= self.num_features)][0]
            raise fail(f"feature index {int(bad)} not in [0, {self.num_features})")
        with np.errstate(over="ignore"):  # too big for float32 becomes inf, reported below
            values32 = values.astype(np.float32)
        if not np.isfinite(values32).all():
            raise fail(f"feature value {values[~np.isfinite(values32)][0]} is not a finite float32")
        return labels, idx.astype(np.int64), values32


def _is_feature(token: str) -> bool:
    index, sep, value = token.partition(":")
    try:
        int(index)
        float(value)
    except ValueError:
        return False
    return sep == ":"
