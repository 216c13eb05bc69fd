"""make_loader: stream shards to batches whose sequence does not depend on the world size.

Which samples go into which global batch is `partition`'s scheme: V streams, each a contiguous range
of the epoch's shuffled shard order with its own shuffle buffer (seeded from (seed, epoch, stream)),
and every global batch takes a fixed number of samples from each stream. A rank serves V / W of
them. DataLoader workers split a rank's batches, not its streams: worker w collates (and tokenizes)
batches w, w + workers, ..., and reads past the others' samples without collating them; torch hands
worker batches out round-robin, so the rank sees them in order. Decoding is repeated in every worker
(cheap next to collation and tokenization); the sequence is the same for any number of workers.

Position: `position_after(k)` is how many samples of each stream the first k batches consumed; a
loader built with `position=` that list continues the epoch exactly, on any world size that divides V,
with any batch size (a new global batch changes the takes, not which samples are left).
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
from collections import deque
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
    """The batches of one rank for one epoch; DataLoader worker w yields every workers-th of them."""

    def __init__(self, loader: ShardLoader) -> None:
        super().__init__()
        self.loader = loader

    def __iter__(self) -> Iterator[Batch | _Failure]:
        info = get_worker_info()
        try:
            yield from self.loader._worker_batches(info.id if info is not None else 0)
        except DataError as exn:
            if info is None:
                raise
            yield _Failure(exn)


class ShardLoader:
    """Iterable of Batch for one rank and epoch; `len()` is the same on every rank. A text set needs
    `tokenizer` (ValueError otherwise); other sets ignore it. See the module docstring for `streams`
    (default: world_size) and `position`."""

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
        streams: int | None = None,
        position: list[int] | None = None,
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
        V = streams or world_size
        misfit = partition.streams_misfit(V, world_size, batch_size)
        if misfit:
            raise ValueError(misfit)
        self.set = shard_set
        self.manifest: Manifest = shard_set.manifest
        self.tokenizer = tokenizer if self.manifest.feature_kind == "text" else None
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.epoch, self.seed = epoch, seed
        self.num_workers = num_workers
        self.shuffle, self.shuffle_size = shuffle, shuffle_buffer
        self.streams = V
        self.lengths = partition.stream_lengths(shard_set.num_samples, V)
        self.takes = partition.stream_takes(batch_size * world_size, V)
        self.mine = partition.rank_streams(V, world_size, rank)
        self.start = [0] * V if position is None else list(position)
        counts = zip(self.start, self.lengths, strict=False)
        if len(self.start) != V or not all(0 <= c <= n for c, n in counts):
            raise ValueError(f"position {position} is not a sample count for each of {V} data streams")
        self.bad_samples, self.drop_last = bad_samples, drop_last
        self.prefetch_factor = prefetch_factor
        self.skipped = 0  # bad samples skipped in the last iteration (all workers)

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields in a full epoch."""
        return partition.steps_left(self.lengths, [0] * self.streams, self.takes, self.drop_last)

    def __len__(self) -> int:
        """Batches the next iteration yields: the rest of the epoch from `position`."""
        return partition.steps_left(self.lengths, self.start, self.takes, self.drop_last)

    def position_after(self, batches: int) -> list[int]:
        """Samples of each stream consumed once this iteration has yielded `batches` batches."""
        return partition.advance(self.start, self.takes, self.lengths, batches)

    def set_epoch(self, epoch: int) -> None:
        """Move to another epoch (and start it from its first batch)."""
        self.epoch, self.start = epoch, [0] * self.streams

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
                    # run would draw its dropout masks from a shifted stream); the shuffles are
                    # seeded from (seed, epoch, stream) anyway
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
    def _stream_samples(self, reader: SegmentReader, stream: int) -> Iterator[Sample]:
        counts = [s.num_samples for s in self.set.shards]
        order = partition.epoch_order(len(counts), self.seed, self.epoch, self.shuffle)
        lo, hi = partition.unit_range(self.set.num_samples, self.streams, stream)
        samples = reader.samples(partition.segments(counts, order, lo, hi))
        if self.shuffle:
            rng = random.Random(f"{self.seed}/{self.epoch}/{stream}")
            samples = shuffle_buffer(samples, self.shuffle_size, rng)
        return samples

    def _worker_batches(self, worker: int) -> Iterator[Batch]:
        """Batches worker, worker + workers, ... of this iteration. Every stream first reads past the
        samples before `position`; a stream short of its take pads with repeats of its latest samples
        (the same ones whether or not the run was resumed), or empty rows before it has read any."""
        m, workers = self.manifest, max(1, self.num_workers)
        reader = SegmentReader(self.set, self.bad_samples)
        streams, recent = [], []
        for s in self.mine:
            samples = self._stream_samples(reader, s)
            latest = deque(itertools.islice(samples, self.start[s]), maxlen=self.takes[s])
            streams.append(samples)
            recent.append(latest)
        own_bad, total = 0, len(self)
        for k in range(total):
            if k > total - 1 - (total - 1 - worker) % workers:
                break  # past this worker's last batch
            before = reader.skipped
            rows: list[Sample] = []
            valid: list[bool] = []
            for s, samples, latest in zip(self.mine, streams, recent, strict=True):
                take = self.takes[s]
                got = list(itertools.islice(samples, take))
                if len(got) == take:
                    rows += got
                else:  # a dry stream: padding repeats what it read last
                    rows += padded(got, take, list(latest), m.feature_kind, m.num_features)
                valid += [True] * len(got) + [False] * (take - len(got))
                latest.extend(got)
            if k % workers != worker:
                continue
            own_bad += reader.skipped - before
            yield collate(rows, valid, m.feature_kind, m.num_features, own_bad, tokenizer=self.tokenizer)
            own_bad = 0


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
    streams: int | None = None,
    position: list[int] | None = None,
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
    mismatch with the manifest is a DataError. streams: V, the data streams of the sample order
    (default world_size; world_size must divide it, and batch_size x world_size be at least V).
    position: samples already consumed of each stream this epoch (a loader's `position_after`), to
    continue it, on this or another world size. tokenizer: required for a text set (its batches carry
    input_ids, attention_mask and texts), ignored otherwise.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
    if num_workers < 0 or shuffle_buffer < 0:
        raise ValueError("num_workers and shuffle_buffer must not be negative")
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
        streams=streams,
        position=position,
        bad_samples=bad_samples,
        drop_last=drop_last,
        prefetch_factor=prefetch_factor,
        tokenizer=tokenizer,
    )
