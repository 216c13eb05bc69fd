"""manifest.json: what a folder of shards holds, written last so its presence means "complete".

The loader plans an epoch from the manifest alone (sample counts per shard give equal batch counts per
rank without reading any shard), and the trainer sizes its model from it. Label frequencies live in
`label_frequencies.npy` beside it: 670K integers are too many for JSON. The label vocabulary, when the
set has one, lives in `label_names.txt` (UTF-8, one name per line, line i = label id i); the
manifest's `label_names_file` names it (null or absent: no names; manifests written before the key
existed read as such). Raw-text sets (`feature_kind="text"`) have `num_features=0`: the model's
tokenizer makes their features.

This module is the one owner of the folder's file format: the writer and the readers of every file
above go through it.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.data.errors import DataError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FREQUENCIES_NAME = "label_frequencies.npy"
LABEL_NAMES = "label_names.txt"
FEATURE_KINDS = ("bow", "dense", "text")
FeatureKind = Literal["bow", "dense", "text"]


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    sha256: str


@dataclass
class Manifest:
    """Counts, dimensions and shard list of one converted set (train or test)."""

    num_samples: int
    num_features: int
    num_labels: int
    feature_kind: FeatureKind
    shards: list[ShardInfo]
    label_frequencies: np.ndarray = field(repr=False)
    feature_dtype: str = "float32"
    format_version: int = FORMAT_VERSION
    source: str = ""
    label_names_file: str | None = None  # LABEL_NAMES beside the manifest, or None: no names
    path: str = ""  # where it was read from; not stored

    def check(
        self,
        num_features: int | None = None,
        num_labels: int | None = None,
        feature_kind: str | None = None,
    ) -> None:
        """Raise DataError when the data disagrees with what the run configuration expects."""
        for name, want in (("num_features", num_features), ("num_labels", num_labels)):
            have = getattr(self, name)
            if want is not None and have != want:
                raise DataError(f"{name}={have} but the configuration expects {want}", file=self.path)
        if feature_kind is not None and self.feature_kind != feature_kind:
            raise DataError(
                f"feature_kind={self.feature_kind!r} but the configuration expects {feature_kind!r}",
                file=self.path,
            )

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["label_frequencies"], out["path"]
        out["label_frequencies_file"] = FREQUENCIES_NAME
        return out


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write the frequencies file, then manifest.json, each under a temporary name then renamed."""
    folder = Path(folder)
    freq_tmp = folder / f".{FREQUENCIES_NAME}.tmp"
    with open(freq_tmp, "wb") as f:
        np.save(f, np.asarray(manifest.label_frequencies, dtype=np.int64))
    os.replace(freq_tmp, folder / FREQUENCIES_NAME)
    tmp = folder / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    os.replace(tmp, folder / MANIFEST_NAME)
    manifest.path = str(folder / MANIFEST_NAME)
    return folder / MANIFEST_NAME


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_label_names(folder: str | os.PathLike, names: list[str]) -> Path:
    """Write `label_names.txt` (line i = the name of label id i) under a temporary name, then rename.
    Call it before write_manifest, so a manifest that names the file finds it complete. A name with a
    line break (or one that is not valid Unicode) is a ValueError: it would shift every later id."""
    for i, name in enumerate(names):
        if not isinstance(name, str) or "\n" in name or "\r" in name:
            raise ValueError(f"label name {i} must be a str without line breaks, got {name!r}")
    try:
        data = "".join(name + "\n" for name in names).encode("utf-8")
    except UnicodeEncodeError as exn:
        raise ValueError(f"label names must be valid Unicode: {exn}") from None
    path = Path(folder) / LABEL_NAMES
    _atomic_write(path, data)
    return path


def read_label_names(source: str | os.PathLike | Manifest) -> list[str] | None:
    """The label names of a converted set (a folder, a manifest path/URL or a Manifest read from
    one): names[i] is label id i's. None when the set has none; DataError naming the file when it is
    missing, not UTF-8, or holds another number of names than num_labels."""
    m = source if isinstance(source, Manifest) else read_manifest(source)
    if m.label_names_file is None:
        return None
    base = m.path.rsplit("/", 1)[0] if "/" in m.path else "."
    url = f"{base}/{m.label_names_file}"
    try:
        text = _read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        raise DataError("label names file is missing (the manifest names it)", file=url) from None
    except OSError as exn:
        raise DataError(f"cannot read label names: {exn}", file=url) from None
    except UnicodeDecodeError as exn:
        raise DataError(f"label names are not UTF-8 text: {exn}", file=url) from None
    names = text.removesuffix("\n").split("\n") if text else []
    if len(names) != m.num_labels:
        raise DataError(f"{len(names)} label names but num_labels={m.num_labels}", file=url)
    return names


def _read_bytes(url: str) -> bytes:
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://")).read_bytes()
    from webdataset import gopen  # remote: whatever schemes webdataset's gopen knows

    with gopen(url, "rb") as stream:
        return stream.read()


def manifest_url(source: str) -> str:
    """The manifest of a folder, or the manifest itself when given one."""
    if source.endswith(".json"):
        return source
    return source.rstrip("/") + "/" + MANIFEST_NAME


def read_manifest(source: str | os.PathLike) -> Manifest:
    """Read and validate `manifest.json` of a folder (or a manifest path/URL)."""
    url = manifest_url(str(source))
    try:
        raw = _read_bytes(url)
    except FileNotFoundError:
        raise DataError(
            "no manifest.json: not a converted data folder (or the conversion did not finish)", file=url
        ) from None
    except OSError as exn:
        raise DataError(f"cannot read manifest: {exn}", file=url) from None
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise DataError(f"not valid JSON: {exn}", file=url) from None
    return _from_json(doc, url)


def _from_json(doc: Any, url: str) -> Manifest:
    def need(key: str, kind: type) -> Any:
        if not isinstance(doc, dict) or key not in doc:
            raise DataError(f"missing field {key!r}", file=url)
        value = doc[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise DataError(f"field {key!r} must be {kind.__name__}, got {value!r}", file=url)
        return value

    version = need("format_version", int)
    if version != FORMAT_VERSION:
        raise DataError(
            f"format_version {version} is not supported (this code reads {FORMAT_VERSION})", file=url
        )
    kind = need("feature_kind", str)
    if kind not in FEATURE_KINDS:
        raise DataError(f"feature_kind must be 'bow', 'dense' or 'text', got {kind!r}", file=url)
    dims = {k: need(k, int) for k in ("num_samples", "num_features", "num_labels")}
    for k, v in dims.items():
        if k == "num_features" and kind == "text":
            if v != 0:
                raise DataError(f"num_features must be 0 for a text set, got {v}", file=url)
        elif v < (0 if k == "num_samples" else 1):
            raise DataError(f"{k} must be positive, got {v}", file=url)
    names_file = doc.get("label_names_file")
    if names_file is not None and (not isinstance(names_file, str) or not names_file or "/" in names_file):
        raise DataError(f"field 'label_names_file' must be a file name or null, got {names_file!r}", file=url)
    shards = []
    for i, entry in enumerate(need("shards", list)):
        try:
            shard = ShardInfo(
                name=str(entry["name"]), num_samples=int(entry["num_samples"]), sha256=str(entry["sha256"])
            )
        except (KeyError, TypeError, ValueError):
            raise DataError(f"shards[{i}] must have name, num_samples, sha256: {entry!r}", file=url) from None
        if shard.num_samples < 0 or "/" in shard.name:
            raise DataError(f"shards[{i}] is invalid: {entry!r}", file=url)
        shards.append(shard)
    total = sum(s.num_samples for s in shards)
    if total != dims["num_samples"]:
        raise DataError(f"shards hold {total} samples but num_samples={dims['num_samples']}", file=url)
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    freq_url = f"{base}/{need('label_frequencies_file', str)}"
    try:
        freqs = np.load(io.BytesIO(_read_bytes(freq_url)), allow_pickle=False)
    except (OSError, ValueError) as exn:
        raise DataError(f"cannot read label frequencies: {exn}", file=freq_url) from None
    if freqs.shape != (dims["num_labels"],) or freqs.dtype.kind not in "iu":
        raise DataError(
            f"label frequencies must be {dims['num_labels']} integers, got {freqs.dtype} {freqs.shape}",
            file=freq_url,
        )
    return Manifest(
        **dims,
        feature_kind=kind,
        shards=shards,
        label_frequencies=freqs.astype(np.int64, copy=False),
        feature_dtype=str(doc.get("feature_dtype", "float32")),
        format_version=version,
        source=str(doc.get("source", "")),
        label_names_file=names_file,
        path=url,
    )
