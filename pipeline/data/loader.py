"""make_loader: stream shards to batches, split by rank and DataLoader worker, equal batches per rank.

How the work is split and padded is in `partition` (contiguous sample ranges over the epoch's
shuffled shard order, every worker yields the same number of batches); rows are collated in the
workers (`collate`). Determinism: the shard order comes from (seed, epoch), each worker's shuffle
buffer from (seed, epoch, rank, worker), and torch's DataLoader hands out worker batches round-robin,
so the batch sequence is a function of (seed, epoch, world_size, num_workers, batch_size).
Resume: `skip_batches=k` gives the same sequence minus its first k batches; workers take over each
other's roles (worker w plays role (w + k) % workers) so the round-robin continues where it stopped,
and each role reads past its skipped batches without collating them.
Text sets: each worker tokenizes its batches with the `tokenizer` (a TextTokenizer, loaded once per
worker process); skipped batches are not tokenized.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import partition
from pipeline.data.collate import Batch, Sample, collate, padded
from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest
from pipeline.data.shard_reader import SegmentReader
from pipeline.data.sources import ShardSet, resolve
from pipeline.data.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def shuffle_buffer(items: Iterator[Sample], size: int, rng: random.Random) -> Iterator[Sample]:
    """Yield items in a random order using a buffer of `size` (0 or 1: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buf: list[Sample] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def _ignore_stop_signals(worker: int) -> None:
    """In a worker: SIGTERM and SIGUSR1 are for the rank it serves, which decides when to stop
    (`pipeline.train.preemption`); launchers signal the whole process tree, and a worker ended by
    one would fail the rank's next batch before its checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class _Failure:
    """A DataError raised in a worker, carried to the main process intact (fields and message)."""

    def __init__(self, error: DataError) -> None:
        self.error = error


class _EpochStream(IterableDataset):
    """The batches of one rank for one epoch; each DataLoader worker plays one role."""

    def __init__(self, loader: ShardLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[Batch | _Failure]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        lo = self.loader
        role = (worker + lo.skip_batches) % lo.roles
        try:
            yield from lo._role_batches(role)
        except DataError as exn:
            if info is None:
                raise
            yield _Failure(exn)


class ShardLoader:
    """Iterable of Batch for one rank and epoch; `len()` is the same on every rank. A text set needs
    `tokenizer` (ValueError otherwise); other sets ignore it."""

    def __init__(
        self,
        shard_set: ShardSet,
        batch_size: int,
        rank: int,
        world_size: int,
        *,
        epoch: int = 0,
        seed: int = 0,
        num_workers: int = 1,
        shuffle: bool = True,
        shuffle_buffer: int = 2000,
        skip_batches: int = 0,
        bad_samples: str = "error",
        drop_last: bool = False,
        prefetch_factor: int = 4,
        tokenizer: TextTokenizer | None = None,
    ) -> None:
        if shard_set.manifest.feature_kind == "text" and tokenizer is None:
            raise ValueError(
                f"text shards need a tokenizer: model.encoder.path ({shard_set.manifest.path} holds raw "
                "text; pass tokenizer=TextTokenizer(the model folder))"
            )
        self.set = shard_set
        self.manifest: Manifest = shard_set.manifest
        self.tokenizer = tokenizer if self.manifest.feature_kind == "text" else None
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.seed = epoch, seed
        self.num_workers = num_workers
        self.roles = max(1, num_workers)
        self.shuffle, self.shuffle_size = shuffle, shuffle_buffer
        self.skip_batches = skip_batches
        self.bad_samples, self.drop_last = bad_samples, drop_last
        self.prefetch_factor = prefetch_factor
        self.skipped = 0  # bad samples skipped in the last iteration (all workers)
        self.per_worker = partition.batches_per_worker(
            shard_set.num_samples, world_size * self.roles, batch_size, drop_last
        )

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a full epoch."""
        return self.roles * self.per_worker

    def __len__(self) -> int:
        """Batches the next iteration yields: a full epoch minus `skip_batches`."""
        return max(0, self.batches_per_epoch - self.skip_batches)

    def set_epoch(self, epoch: int) -> None:
        """Move to another epoch (and start it from its first batch)."""
        self.epoch, self.skip_batches = epoch, 0

    def __iter__(self) -> Iterator[Batch]:
        self.skipped = 0
        stream = _EpochStream(self)
        if self.num_workers == 0:
            source = iter(stream)
        else:
            source = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    prefetch_factor=self.prefetch_factor,
                    persistent_workers=False,
                    # its own generator: starting workers must not draw from the global RNG (a resumed
                    # run would draw its dropout masks from a shifted stream); the workers' shuffles
                    # are seeded from (seed, epoch, rank, worker) anyway
                    generator=torch.Generator().manual_seed(self.seed),
                    worker_init_fn=_ignore_stop_signals,
                )
            )
        count = 0
        try:
            for item in source:
                if isinstance(item, _Failure):
                    raise item.error
                self.skipped += item.skipped
                count += 1
                yield item
        finally:
            del source  # stop the workers now, not whenever a traceback holding this frame is collected
        if self.skipped:
            log.warning("rank %d epoch %d: skipped %d bad samples", self.rank, self.epoch, self.skipped)
        if count != len(self):
            raise RuntimeError(
                f"internal error: rank {self.rank} yielded {count} batches, expected {len(self)}"
            )

    # -- inside a worker ---------------------------------------------------------------------------
    def _role_batches(self, role: int) -> Iterator[Batch]:
        m, B = self.manifest, self.batch_size
        unit = self.rank * self.roles + role
        counts = [s.num_samples for s in self.set.shards]
        order = partition.epoch_order(len(counts), self.seed, self.epoch, self.shuffle)
        lo, hi = partition.unit_range(self.set.num_samples, self.world_size * self.roles, unit)
        reader = SegmentReader(self.set, self.bad_samples)
        samples = reader.samples(partition.segments(counts, order, lo, hi))
        if self.shuffle:
            rng = random.Random(f"{self.seed}/{self.epoch}/{unit}")
            samples = shuffle_buffer(samples, self.shuffle_size, rng)
        skip = partition.skipped_for_role(self.skip_batches, role, self.roles)
        total, produced, reported = self.per_worker, 0, 0
        previous: list[Sample] = []
        kind, dim = m.feature_kind, m.num_features

        def make(rows: list[Sample]) -> Batch | None:
            nonlocal produced, reported, previous
            produced += 1
            if produced <= skip:
                previous = rows or previous
                return None
            batch = collate(
                padded(rows, B, previous, kind, dim),
                len(rows),
                kind,
                dim,
                reader.skipped - reported,
                tokenizer=self.tokenizer,
            )
            reported = reader.skipped
            previous = rows or previous
            return batch

        rows: list[Sample] = []
        if total > 0:
            for sample in samples:
                rows.append(sample)
                if len(rows) == B:
                    batch = make(rows)
                    rows = []
                    if batch is not None:
                        yield batch
                    if produced == total:
                        break
        while produced < total:  # last partial batch, then all-padding batches
            batch = make(rows)
            rows = []
            if batch is not None:
                yield batch


def make_loader(
    source: str | os.PathLike,
    batch_size: int,
    rank: int,
    world_size: int,
    *,
    epoch: int = 0,
    seed: int = 0,
    num_workers: int = 1,
    shuffle: bool = True,
    shuffle_buffer: int = 2000,
    skip_batches: int = 0,
    bad_samples: str = "error",
    drop_last: bool = False,
    expected: tuple[int, int] | None = None,
    manifest: str | None = None,
    prefetch_factor: int = 4,
    tokenizer: TextTokenizer | None = None,
) -> ShardLoader:
    """Loader of one rank's batches for one epoch.

    source: folder with manifest.json (local or URL), or shard URL / brace list (manifest beside the
    shards, or `manifest=`). expected: (num_features, num_labels) from the run configuration; a
    mismatch with the manifest is a DataError. Resume with the same world_size, num_workers and
    batch_size and `skip_batches` = batches already consumed this epoch. tokenizer: required for a
    text set (its batches carry input_ids, attention_mask and texts), ignored otherwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if num_workers < 0 or skip_batches < 0 or shuffle_buffer < 0:
        raise ValueError("num_workers, skip_batches and shuffle_buffer must not be negative")
    if bad_samples not in ("error", "skip"):
        raise ValueError(f"bad_samples must be 'error' or 'skip', got {bad_samples!r}")
    shard_set = resolve(source, manifest)
    if expected is not None:
        shard_set.manifest.check(num_features=expected[0], num_labels=expected[1])
    return ShardLoader(
        shard_set,
        batch_size,
        rank,
        world_size,
        epoch=epoch,
        seed=seed,
        num_workers=num_workers,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        skip_batches=skip_batches,
        bad_samples=bad_samples,
        drop_last=drop_last,
        prefetch_factor=prefetch_factor,
        tokenizer=tokenizer,
    )
