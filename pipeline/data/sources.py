"""Turn a loader `source` into a manifest and the URLs of its shards.

A source is a folder (local path or URL) holding manifest.json, or shard URLs: one path, a brace list
(`shards/shard-{000000..000009}.tar`) or any URL webdataset's gopen opens (file://, http(s)://,
pipe:...). Shard URLs need their manifest for sample counts: it is looked up beside the first shard,
or given explicitly (required for `pipe:` URLs). A shard list may be a subset of the manifest's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from webdataset.shardlists import expand_urls

from pipeline.data.errors import DataError
from pipeline.data.manifest import Manifest, ShardInfo, read_manifest


@dataclass
class ShardSet:
    manifest: Manifest
    urls: list[str]
    shards: list[ShardInfo]
    first_ids: list[int]  # id of each shard's first sample in the converted set

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _is_shard_list(source: str) -> bool:
    return "{" in source or source.endswith((".tar", ".tar.gz", ".tgz")) or source.startswith("pipe:")


def resolve(source: str | os.PathLike, manifest: str | None = None) -> ShardSet:
    source = str(source)
    if not _is_shard_list(source):
        m = read_manifest(manifest or source)
        base = source.rstrip("/")
        urls = [f"{base}/{s.name}" for s in m.shards]
        shards = list(m.shards)
    else:
        urls = expand_urls(source)
        if manifest is None:
            if urls[0].startswith("pipe:"):
                raise DataError("pipe: shard URLs need the manifest passed explicitly", file=source)
            manifest = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
        m = read_manifest(manifest)
        by_name = {s.name: s for s in m.shards}
        shards = []
        for url in urls:
            name = url.rsplit("/", 1)[-1].split()[0]
            if name not in by_name:
                raise DataError(f"shard {name!r} is not listed in the manifest", file=m.path)
            shards.append(by_name[name])
    starts, pos = {}, 0
    for s in m.shards:
        starts[s.name], pos = pos, pos + s.num_samples
    return ShardSet(m, urls, shards, [starts[s.name] for s in shards])
