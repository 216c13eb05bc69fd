"""Batch: what the trainer gets, and how samples become one.

Every batch has exactly `batch_size` rows on every rank (model-parallel all-gathers need equal shapes).
Rows that only fill it up are marked `valid=False`, anywhere in the batch: they repeat real rows read
just before (or are empty when none was read) and must be excluded from the loss and the metrics.
BoW features come as (indices, offsets, per-sample weights) for `nn.EmbeddingBag(mode="sum")`; raw
texts as the model tokenizer's (input_ids, attention_mask), tokenized here, in the loader's workers,
padded to the batch's longest row, plus the texts themselves; labels as CSR; a dense multi-hot matrix
only on request.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.data.tokenizer import TextTokenizer

# A decoded sample: (sample id, feature ids int32, values float32, labels int32) for BoW,
# (sample id, embedding float32|float16 [d], labels int32) for dense, (sample id, text str, labels
# int32) for text.
Sample = tuple


@dataclass
class Batch:
    sample_ids: torch.Tensor  # int64 [B], position in the converted set
    valid: torch.Tensor  # bool [B]; False = padding row
    label_indptr: torch.Tensor  # int64 [B+1]
    label_indices: torch.Tensor  # int64 [nnz labels]
    feature_indices: torch.Tensor | None = None  # int64 [nnz], bow
    feature_offsets: torch.Tensor | None = None  # int64 [B], start of each row in feature_indices, bow
    feature_weights: torch.Tensor | None = None  # float32 [nnz], bow
    dense: torch.Tensor | None = None  # float32 [B, d], dense
    input_ids: torch.Tensor | None = None  # int64 [B, T], text: token ids, T = longest row <= max_length
    attention_mask: torch.Tensor | None = None  # int64 [B, T], text: 1 = token, 0 = padding
    texts: list[str] | None = None  # B raw texts (padding rows included), text
    skipped: int = 0  # bad samples dropped (bad_samples="skip") by this worker since its previous batch

    @property
    def size(self) -> int:
        return int(self.valid.shape[0])

    @property
    def num_valid(self) -> int:
        return int(self.valid.sum())

    def multi_hot(self, num_labels: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [B, num_labels] 0/1 targets (only when asked: 670K labels x B is large)."""
        out = torch.zeros(self.size, num_labels, dtype=dtype, device=self.label_indices.device)
        rows = torch.repeat_interleave(
            torch.arange(self.size, device=out.device),
            self.label_indptr.diff(),
            output_size=len(self.label_indices),
        )
        out[rows, self.label_indices] = 1
        return out

    def _map(self, fn) -> Batch:
        changes = {
            f.name: fn(getattr(self, f.name))
            for f in fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Batch:  # lets DataLoader(pin_memory=True) handle Batch
        return self._map(lambda t: t.pin_memory())


def _csr(parts: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    indptr = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=indptr[1:])
    return torch.from_numpy(indptr), indptr


def _cat(parts: list[np.ndarray], dtype) -> torch.Tensor:
    if not parts:
        return torch.from_numpy(np.empty(0, dtype=dtype))
    return torch.from_numpy(np.concatenate(parts).astype(dtype, copy=False))


def collate(
    rows: list[Sample],
    valid: list[bool],
    kind: str,
    dim: int = 0,
    skipped: int = 0,
    tokenizer: TextTokenizer | None = None,
) -> Batch:
    """Batch of `rows`, where valid[i] tells a real row from padding; kind "text" needs the tokenizer
    (run here, so in the worker that collates)."""
    sample_ids = torch.tensor([r[0] for r in rows], dtype=torch.int64)
    labels = [r[-1] for r in rows]
    label_indptr, _ = _csr(labels)
    mask = torch.tensor(valid, dtype=torch.bool)
    batch = Batch(sample_ids, mask, label_indptr, _cat(labels, np.int64), skipped=skipped)
    if kind == "bow":
        ids = [r[1] for r in rows]
        _, indptr = _csr(ids)
        batch.feature_indices = _cat(ids, np.int64)
        batch.feature_offsets = torch.from_numpy(indptr[:-1].copy())
        batch.feature_weights = _cat([r[2] for r in rows], np.float32)
    elif kind == "text":
        if tokenizer is None:
            raise ValueError("text shards need a tokenizer: model.encoder.path")
        batch.texts = [r[1] for r in rows]
        batch.input_ids, batch.attention_mask = tokenizer(batch.texts)
    else:
        dense = np.stack([r[1] for r in rows]) if rows else np.empty((0, dim), np.float32)
        batch.dense = torch.from_numpy(dense.astype(np.float32, copy=False))
    return batch


def empty_sample(kind: str, dim: int) -> Sample:
    """Stand-in for padding when a rank has no real sample to repeat: no features, no labels (text: the
    empty text, which tokenizes to the special tokens alone)."""
    none_i, none_f = np.empty(0, np.int32), np.empty(0, np.float32)
    if kind == "bow":
        return (-1, none_i, none_f, none_i)
    if kind == "text":
        return (-1, "", none_i)
    return (-1, np.zeros(dim, np.float32), none_i)


def padded(real: list[Sample], size: int, fallback: list[Sample], kind: str, dim: int) -> list[Sample]:
    """`real` followed by padding up to `size` rows (repeats of real, else of fallback, else empty)."""
    source = real or fallback or [empty_sample(kind, dim)]
    return real + [source[i % len(source)] for i in range(size - len(real))]
