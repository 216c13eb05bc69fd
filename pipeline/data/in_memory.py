"""Batches of texts held in memory (given on the command line or read from a file), for predicting on
raw text without converting it to shards first.

Split exactly as the loader splits an unshuffled set with one stream per rank (`partition`): rank r
takes the contiguous range `unit_range(N, world_size, r)` of the texts in their given order, and
every rank gets the same number of full-size batches, ceil(largest range / batch_size); rows that
only fill them up are `valid=False` (repeats of the rank's real rows, or empty texts when the rank has
none). sample_ids are positions in `texts`, so predictions of all ranks merge back into input order.
"""

from __future__ import annotations

import numpy as np

from pipeline.data import partition
from pipeline.data.collate import Batch, Sample, collate, padded
from pipeline.data.tokenizer import TextTokenizer


def text_batches(
    texts: list[str],
    tokenizer: TextTokenizer,
    batch_size: int,
    rank: int,
    world_size: int,
    labels: list[list[int]] | None = None,
) -> list[Batch]:
    """The batches of rank `rank` (see the module docstring); `labels[i]` are text i's label ids
    (none when not given). An empty or whitespace-only text is a ValueError, as it is in a data set."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"{len(labels)} label lists for {len(texts)} texts")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} is empty (or not a str): {text!r}")
    lo, hi = partition.unit_range(len(texts), world_size, rank)
    lengths = partition.stream_lengths(len(texts), world_size)
    total = partition.steps_left(lengths, [0] * world_size, [batch_size] * world_size, drop_last=False)
    none = np.empty(0, np.int64)
    rows: list[Sample] = [
        (i, texts[i], none if labels is None else np.asarray(labels[i], dtype=np.int64))
        for i in range(lo, hi)
    ]
    out, previous = [], []
    for b in range(total):
        real = rows[b * batch_size : (b + 1) * batch_size]
        batch_rows = padded(real, batch_size, previous, "text", 0)
        valid = [True] * len(real) + [False] * (batch_size - len(real))
        out.append(collate(batch_rows, valid, "text", tokenizer=tokenizer))
        previous = real or previous
    return out
