"""Which samples each rank reads in an epoch, in which global batch, and how many batches there are.

Training scheme (streams): the epoch's shard order (shuffled from (seed, epoch), or manifest order)
is one sequence of N samples, cut into V contiguous streams of floor/ceil(N / V) samples; each stream
has its own shuffle buffer. Every global batch of G = batch_size x world_size samples takes the same
number of samples from each stream, `stream_takes(G, V)` (G // V or one more). Rank r of W serves the
V / W consecutive streams `rank_streams(V, W, r)`, whose takes add up to exactly its batch_size. The
sequence of global batches is therefore a function of (seed, epoch, V, G) alone: a job resumed on
another world size with the same global batch continues it exactly, and the data position is a
count of samples per stream (`advance`), whatever the batch size.

A stream that runs dry fills its part of the batch with padding rows (`valid=False`), so every rank
yields the same number of batches, `steps_left` (with drop_last: only batches where no stream is dry).

With V = world_size (evaluation, prediction, and training by default) rank r reads one contiguous
range, `unit_range(N, W, r)`, and every rank yields ceil(largest range / batch_size) batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    shard: int  # index in the shard list
    start: int  # first sample in the shard
    stop: int  # one past the last


def epoch_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(num_shards).tolist()


def unit_range(total: int, units: int, unit: int) -> tuple[int, int]:
    return unit * total // units, (unit + 1) * total // units


def streams_misfit(streams: int, world_size: int, batch_size: int) -> str | None:
    """Why `streams` data streams cannot serve world_size ranks of batch_size samples, or None."""
    if streams % world_size:
        return f"{streams} data streams cannot be shared by {world_size} ranks: not a multiple"
    if batch_size * world_size < streams:
        return (
            f"a global batch of {batch_size} x {world_size} samples cannot take one from each of "
            f"{streams} data streams"
        )
    return None


def stream_takes(global_batch: int, streams: int) -> list[int]:
    """Samples stream s gives to every global batch: floor((s+1) G / V) - floor(s G / V), at least one
    when G >= V. The takes of a rank's V / W streams add up to floor((r+1) G / W) - floor(r G / W),
    which is G / W when W divides G."""
    return [(s + 1) * global_batch // streams - s * global_batch // streams for s in range(streams)]


def rank_streams(streams: int, world_size: int, rank: int) -> range:
    """The streams rank `rank` serves (world_size divides streams)."""
    per = streams // world_size
    return range(rank * per, (rank + 1) * per)


def stream_lengths(total: int, streams: int) -> list[int]:
    return [hi - lo for lo, hi in (unit_range(total, streams, s) for s in range(streams))]


def steps_left(lengths: list[int], consumed: list[int], takes: list[int], drop_last: bool) -> int:
    """Global batches left in the epoch after stream s gave consumed[s] of its lengths[s] samples: until
    the last stream is dry (drop_last: while none is short of its take)."""
    left = [max(0, n - c) for n, c in zip(lengths, consumed, strict=True)]
    if drop_last:
        return min(r // t for r, t in zip(left, takes, strict=True))
    return max(-(-r // t) for r, t in zip(left, takes, strict=True))


def advance(consumed: list[int], takes: list[int], lengths: list[int], steps: int) -> list[int]:
    """Samples of each stream given after `steps` more global batches."""
    return [min(n, c + steps * t) for c, t, n in zip(consumed, takes, lengths, strict=True)]


def segments(counts: list[int], order: list[int], lo: int, hi: int) -> list[Segment]:
    """The pieces of shards that positions lo..hi-1 of the ordered stream fall on."""
    out, pos = [], 0
    for shard in order:
        n = counts[shard]
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append(Segment(shard, a - pos, b - pos))
        pos += n
        if pos >= hi:
            break
    return out
