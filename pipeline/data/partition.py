"""Which samples each (rank, worker) reads in an epoch, and how many batches everyone yields.

Scheme: the epoch's shard order (shuffled from (seed, epoch), or manifest order) is one stream of N
samples. It is cut into `world_size * workers` contiguous ranges of floor/ceil(N / units) samples,
rank-major: unit u = rank * workers + worker. A unit reads whole shards where its range covers them
and part of a shard at its two ends (skipping the leading samples without decoding them), so each
sample belongs to exactly one unit, and it works with fewer shards than units (units then share a
shard). Units differ by at most one sample, so padding is at most one partial batch per worker.

Every worker yields the same number of batches T: ceil(largest unit / B), or floor(smallest unit / B)
with drop_last (extra samples of bigger units are then dropped); a worker that runs dry pads with
batches whose rows are all `valid=False`. A rank yields workers * T batches, so no rank waits on
another. The batch count depends on world_size, workers and batch_size, not on the data order.
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


def batches_per_worker(total: int, units: int, batch_size: int, drop_last: bool) -> int:
    smallest, largest = total // units, -(-total // units)
    return smallest // batch_size if drop_last else -(-largest // batch_size)


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


def skipped_for_role(skip_batches: int, role: int, workers: int) -> int:
    """Batches of worker role `role` among the first `skip_batches` of the round-robin order."""
    return max(0, (skip_batches - role + workers - 1) // workers)
