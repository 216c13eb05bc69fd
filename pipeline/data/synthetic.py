"""Synthetic XMC data shaped like Amazon-670K, with a planted structure a model can learn.

Labels: popularity follows a power law over label ranks (p ~ rank^-0.6): with Amazon-670K's sizes most
labels get fewer than 5 training samples and the head labels a few thousand. A sample has 1 + Poisson(4)
distinct labels (about 5).
Features: every label owns a fixed "signature" of `signature_size` feature ids. A sample draws ~60% of
its feature occurrences from its labels' signatures and the rest from a Zipf background (common
words), then gets tf-idf values ((1 + log tf) * idf, rows L2-normalised): ~75 non-zeros per sample.
A model that learns label -> signature does well; tail labels with one sample stay hard, as in real data.

`SyntheticTask` is the distribution (fixed by seed and sizes); `samples(n, stream)` draws a split from
it, so train (stream 0) and test (stream 1) come from the same distribution. Everything is vectorised
numpy in chunks of `chunk` samples (bounded memory); 100k samples x 100k labels take a few seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Chunk:
    """A block of samples in CSR form, ids ordered within each sample."""

    feat_indptr: np.ndarray
    feat_idx: np.ndarray
    feat_val: np.ndarray
    label_indptr: np.ndarray
    labels: np.ndarray

    @property
    def n(self) -> int:
        return len(self.label_indptr) - 1


def _indptr(rows: np.ndarray, n: int) -> np.ndarray:
    out = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=out[1:])
    return out


@dataclass
class SyntheticTask:
    num_features: int
    num_labels: int
    seed: int = 0
    labels_per_sample: float = 5.0
    feature_draws: float = 100.0  # occurrences drawn per sample; ~75 distinct after merging
    signature_size: int = 16
    signal: float = 0.6
    label_exponent: float = 0.6
    feature_exponent: float = 1.0
    chunk: int = 32_768
    _label_cdf: np.ndarray = field(init=False, repr=False)
    _feature_cdf: np.ndarray = field(init=False, repr=False)
    _signatures: np.ndarray = field(init=False, repr=False)
    _idf: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_features < 1 or self.num_labels < 1:
            raise ValueError("num_features and num_labels must be positive")
        rng = np.random.default_rng([self.seed, 7919])
        L, D = self.num_labels, self.num_features
        popularity = np.arange(1, L + 1, dtype=np.float64) ** -self.label_exponent
        popularity = popularity[rng.permutation(L)]  # popular labels are not simply the small ids
        self._label_cdf = np.cumsum(popularity / popularity.sum())
        background = np.arange(1, D + 1, dtype=np.float64) ** -self.feature_exponent
        background = background[rng.permutation(D)] / background.sum()
        self._feature_cdf = np.cumsum(background)
        self._idf = (1.0 + np.log1p(1.0 / (background * D))).astype(np.float32)  # rarer word, higher idf
        size = min(self.signature_size, D)
        self._signatures = rng.integers(0, D, size=(L, size), dtype=np.int32)

    def samples(self, num_samples: int, stream: int = 0) -> Iterator[Chunk]:
        """Draw `num_samples` samples of split `stream` (0 train, 1 test), chunk by chunk."""
        for index, lo in enumerate(range(0, num_samples, self.chunk)):
            n = min(self.chunk, num_samples - lo)
            yield self._chunk(n, np.random.default_rng([self.seed, stream, index]))

    def _draw(self, cdf: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(size) * cdf[-1], side="right"), len(cdf) - 1)

    def _chunk(self, n: int, rng: np.random.Generator) -> Chunk:
        L, D = self.num_labels, self.num_features
        # labels: 1 + Poisson draws from the power law, duplicates merged
        counts = 1 + rng.poisson(self.labels_per_sample - 1.0, size=n)
        rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        keys = np.unique(rows * L + self._draw(self._label_cdf, rng, len(rows)))
        label_rows, labels = keys // L, (keys % L).astype(np.int32)
        label_indptr = _indptr(label_rows, n)
        # feature occurrences: signature of one of the sample's labels, or background
        draws = np.maximum(rng.poisson(self.feature_draws, size=n), 1)
        rows = np.repeat(np.arange(n, dtype=np.int64), draws)
        feats = self._draw(self._feature_cdf, rng, len(rows))
        signal = rng.random(len(rows)) < self.signal
        srows = rows[signal]
        per_sample = np.diff(label_indptr)[srows]
        pick = label_indptr[srows] + (rng.random(len(srows)) * per_sample).astype(np.int64)
        sig = self._signatures[labels[pick], rng.integers(0, self._signatures.shape[1], size=len(srows))]
        feats[signal] = sig
        keys, tf = np.unique(rows * D + feats, return_counts=True)
        feat_rows, feat_idx = keys // D, (keys % D).astype(np.int32)
        values = (1.0 + np.log(tf.astype(np.float32))) * self._idf[feat_idx]
        norms = np.sqrt(np.bincount(feat_rows, weights=values.astype(np.float64) ** 2, minlength=n))
        values = (values / norms[feat_rows]).astype(np.float32)
        return Chunk(_indptr(feat_rows, n), feat_idx, values, label_indptr, labels)
