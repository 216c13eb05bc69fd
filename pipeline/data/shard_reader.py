"""Read the samples of shard segments with webdataset, decode and check them.

Every failure names the shard and key: an unreadable or truncated tar, a shard with fewer samples
than its manifest entry, a block whose checksum or size is wrong, a key that does not match the
block's position or whose kind is not the manifest's, ids outside the dimensions, NaN/Inf values,
texts that are not UTF-8 or empty. With `bad_samples="skip"` bad samples (and the unreadable rest
of a broken shard) are counted in `skipped` instead of raising. Samples are (sample id, feature ids,
values, labels) for bow, (sample id, embedding, labels) for dense, (sample id, text, labels) for text.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import webdataset as wds
from webdataset.tariterators import tar_file_expander

from pipeline.data import record
from pipeline.data.collate import Sample
from pipeline.data.errors import DataError
from pipeline.data.partition import Segment
from pipeline.data.sources import ShardSet

log = logging.getLogger(__name__)


class SegmentReader:
    def __init__(self, shard_set: ShardSet, bad_samples: str = "error") -> None:
        self.set = shard_set
        self.num_features = shard_set.manifest.num_features
        self.num_labels = shard_set.manifest.num_labels
        self.kind = shard_set.manifest.feature_kind
        self.skip_bad = bad_samples == "skip"
        self.skipped = 0

    def _bad(self, error: DataError, count: int) -> None:
        if not self.skip_bad:
            raise error
        self.skipped += count
        log.warning("skipping %d sample(s): %s", count, error)

    def samples(self, segments: list[Segment]) -> Iterator[Sample]:
        for seg in segments:
            yield from self._segment(seg)

    def _segment(self, seg: Segment) -> Iterator[Sample]:
        info, url = self.set.shards[seg.shard], self.set.urls[seg.shard]
        first_id = self.set.first_ids[seg.shard]
        offset, key = 0, None
        stream = None
        try:
            stream = wds.gopen(url, "rb")
            # one member per block, so no grouping by key is needed (and none of its one-member lag)
            for member in tar_file_expander([{"url": url, "stream": stream}], eof_value=None):
                key, _, ext = member["fname"].rpartition("/")[2].partition(".")
                data = member["data"]
                if ext != record.EXTENSION:
                    raise DataError(
                        f"unexpected member {member['fname']!r} (not .{record.EXTENSION})", shard=url, key=key
                    )
                try:
                    kind, n, block_id = record.read_header(data)
                except ValueError as exn:
                    raise DataError(str(exn), shard=url, key=key) from None
                if kind not in record.KINDS_OF[self.kind]:
                    raise DataError(
                        f"block of kind {kind} in a set whose manifest says feature_kind={self.kind!r}",
                        shard=url,
                        key=key,
                    )
                if block_id != first_id + offset or key != record.block_key(block_id):
                    raise DataError(
                        f"block of sample {block_id} found where sample {first_id + offset} "
                        "was expected: shards mixed up or corrupt",
                        shard=url,
                        key=key,
                    )
                lo, offset = offset, offset + n
                if offset <= seg.start:
                    continue  # before this unit's range: not even decoded
                a, b = max(seg.start - lo, 0), min(n, seg.stop - lo)
                yield from self._block(data, url, key, a, b)
                if offset >= seg.stop:
                    break
            else:
                if offset < seg.stop:
                    raise DataError(
                        f"shard ends after {offset} samples but the manifest lists "
                        f"{info.num_samples}: truncated or corrupt",
                        shard=url,
                        key=key,
                    )
        except DataError as exn:
            self._bad(exn, max(0, seg.stop - max(offset, seg.start)))
        except Exception as exn:  # tarfile / I/O errors of a damaged or missing shard
            detail = str(exn.args[0]) if exn.args else type(exn).__name__
            error = DataError(
                f"unreadable shard ({type(exn).__name__}: {detail})",
                shard=url,
                key=f"after {key}" if key else "(before the first key)",
            )
            self._bad(error, max(0, seg.stop - max(offset, seg.start)))
        finally:
            if stream is not None:
                stream.close()

    def _block(self, data: bytes, url: str, key: str, a: int, b: int) -> Iterator[Sample]:
        try:
            block = record.decode(data)
        except ValueError as exn:
            self._bad(DataError(str(exn), shard=url, key=key), b - a)
            return
        bad = record.bad_rows(block, self.num_features, self.num_labels)
        for row, reason in sorted(bad.items()):
            if a <= row < b:
                self._bad(DataError(f"sample {block.first_id + row}: {reason}", shard=url, key=key), 1)
        lp = block.label_indptr.tolist()
        labels, sid = block.labels, block.first_id
        if block.texts is not None:
            texts = block.texts
            for i in range(a, b):
                if i not in bad:
                    yield (sid + i, texts[i], labels[lp[i] : lp[i + 1]])
            return
        if block.dense is not None:
            dense = block.dense
            for i in range(a, b):
                if i not in bad:
                    yield (sid + i, dense[i], labels[lp[i] : lp[i + 1]])
            return
        fp = block.feat_indptr.tolist()
        idx, val = block.feat_idx, block.feat_val
        for i in range(a, b):
            if i not in bad:
                yield (sid + i, idx[fp[i] : fp[i + 1]], val[fp[i] : fp[i + 1]], labels[lp[i] : lp[i + 1]])
