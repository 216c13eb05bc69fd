"""Build a real extreme-classification data set from the machine's local APT package index.

    python launch/make_debian_xmc.py --out /work/data/debian            # after `apt-get update`

Nothing is downloaded: the script reads the Packages (and, if present, Translation-en) files that
`apt-get update` left under /var/lib/apt/lists, found with `apt-get indextargets` and decompressed with
`/usr/lib/apt/apt-helper cat-file` (which knows every compression APT uses). Without an index it stops
with a non-zero status and asks for `apt-get update`.

One row per package name (a name in several index files, e.g. several suites or architectures, keeps the
stanza with the highest Debian version; ties prefer the native architecture or `all`, then the
architecture name, then the file name, so the choice never depends on the order of the files; when
that stanza has no `Tag:` field, as in bookworm-security and -updates, the tags come from the best stanza
of the same name that has one: debtags describe the package, not the version):

    text    the Description's first line (title); with long descriptions also the long text (content),
            taken from the Description field's continuation lines when the Packages file carries them, or
            from Translation-en joined by Description-md5 (then by package name). `--long` is on by
            default when long text exists (Translation-en files found, or inline in Packages);
            `--no-long` keeps titles only; an explicit `--long` without any long text is an error.
            (Debian's Packages files carry only the first line; APT fetches Translation-en unless
            Acquire::Languages says otherwise, e.g. "none" in slim container images.)
    labels  package names from Depends and Recommends (version constraints, `:any`/`:arch` qualifiers,
            `[arch]` and `<profile>` restrictions removed; every name of an `a | b` alternative; not
            Pre-Depends, Suggests or other relations), each
            `Tag:` value (debtags such as `role::program`) and `section::<Section>`. Labels in fewer
            than --min-label-count training rows are dropped (from test rows too), then rows left
            without a label are dropped (counted in stats.json).
    split   test when sha1(package name) read as a fraction of 2**160 is below --test-fraction, so it
            never depends on order, machine or the other packages.

Outputs in --out (each written under a temporary name and renamed when complete; an old stats.json is
removed first and the new one written last, so its presence means the whole set is from one build):
    trn.jsonl, tst.jsonl  {"uid", "title", "content", "text", "labels": [names, sorted]} per row
    labels.txt            one label per line, line number = id (descending training frequency, then name)
    train.txt, test.txt   XMC-repository BoW of the same rows in the same order: header
                          `num_points num_features num_labels`, then `l1,l2,... f:v f:v ...` with label
                          ids from labels.txt and tf-idf features: tokens [a-z0-9]+ (length >= 2) of the
                          lowercased text, vocabulary fit on training rows (document frequency >= 2, the
                          --max-features most frequent, ids by descending df then word), value
                          (1 + log tf) * log(N / df), rows L2-normalised, 6 significant digits; a row
                          without a known word has no features
    vocab.txt             the feature vocabulary: line number = feature id, `word<TAB>df`
    stats.json            counts, fields found in the index, source files, parameters
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

APT_HELPER = "/usr/lib/apt/apt-helper"
RUN_APT_UPDATE = "run `apt-get update` (as root) to fetch the package index, then run this again"
LABEL_FIELDS = ("Depends", "Recommends")
TOKEN = re.compile(r"[a-z0-9]+")
_FIELD = re.compile(r"^([^\s:#][^:\s]*):[ \t]*(.*(?:\n[ \t].*)*)", re.M)  # name: value + continuations
_RESTRICTION = re.compile(r"\([^)]*\)|\[[^\]]*\]|<[^>]*>")


class IndexMissingError(RuntimeError):
    """No usable APT package index (or a requested part of it) on this machine."""


# ----------------------------------------------------------------------------------------------- index


def _indextargets(*filters: str) -> list[str]:
    try:
        proc = subprocess.run(
            ["apt-get", "indextargets", "-o", "Acquire::Languages=en", "--format", "$(FILENAME)", *filters],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:
        raise IndexMissingError(
            f"apt-get not found: this needs a Debian-based system; {RUN_APT_UPDATE}"
        ) from None
    if proc.returncode != 0:
        raise IndexMissingError(f"`apt-get indextargets` failed: {proc.stderr.strip()}; {RUN_APT_UPDATE}")
    return sorted({line.strip() for line in proc.stdout.splitlines() if line.strip()})


def find_index_files() -> tuple[list[str], list[str]]:
    """(Packages files, Translation-en files) of the local APT index that exist on disk."""
    packages = [f for f in _indextargets("Created-By: Packages") if os.path.isfile(f)]
    translations = [f for f in _indextargets("Created-By: Translations", "Language: en") if os.path.isfile(f)]
    return packages, translations


def read_index_file(path: str | os.PathLike) -> str:
    """The decompressed text of one index file (any compression APT uses) via apt-helper cat-file."""
    path = str(path)
    if not os.path.isfile(path):
        raise IndexMissingError(f"index file {path} does not exist; {RUN_APT_UPDATE}")
    # Into an anonymous temporary file rather than a pipe: 50 MB through a pipe costs thousands of wakeups.
    with tempfile.TemporaryFile() as sink:
        try:
            proc = subprocess.run(
                [APT_HELPER, "cat-file", path], stdout=sink, stderr=subprocess.PIPE, check=False
            )
        except FileNotFoundError:
            raise IndexMissingError(
                f"{APT_HELPER} not found: this needs a Debian-based system with apt"
            ) from None
        if proc.returncode != 0:
            raise IndexMissingError(f"cannot read {path}: {proc.stderr.decode(errors='replace').strip()}")
        sink.seek(0)
        return sink.read().decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------------------- parsing


def parse_stanzas(text: str) -> Iterator[dict[str, str]]:
    """deb822 stanzas as {field: value}; a value's continuation lines stay in it as '\n' + ' line'."""
    for block in text.split("\n\n"):
        fields = dict(_FIELD.findall(block))
        if fields:
            yield fields


def relation_names(value: str) -> list[str]:
    """Package names of a Depends-style field: `a (>= 1) | b:any, c [amd64]` -> ['a', 'b', 'c']."""
    names = []
    for alternative in _RESTRICTION.sub(" ", value.replace("\n", " ")).replace("|", ",").split(","):
        words = alternative.split()
        if words:
            name = words[0].partition(":")[0].strip()
            if name:
                names.append(name)
    return names


def tag_values(value: str) -> list[str]:
    """Debtags of a `Tag:` field (comma separated, possibly over continuation lines)."""
    return [t.strip() for t in value.replace("\n", " ").split(",") if t.strip()]


def stanza_labels(fields: dict[str, str]) -> list[str]:
    """Sorted, distinct label names of one Packages stanza (before the frequency filter)."""
    labels: set[str] = set()
    for field in LABEL_FIELDS:
        labels.update(relation_names(fields.get(field, "")))
    labels.update(tag_values(fields.get("Tag", "")))
    section = fields.get("Section", "").strip()
    if section:
        labels.add(f"section::{section}")
    return sorted(labels)


def split_description(value: str) -> tuple[str, str]:
    """(title, long text) of a Description field; the long text's ' .' paragraph marks become spaces."""
    first, _, rest = value.partition("\n")
    lines = [line.strip() for line in rest.split("\n")]
    long_text = " ".join(line for line in lines if line and line != ".")
    return first.strip(), long_text


# ------------------------------------------------------------------------------------------- versions


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isascii() and c.isalpha():
        return ord(c)
    return ord(c) + 256


def _compare_part(a: str, b: str) -> int:
    """dpkg's verrevcmp: alternating non-digit (letters < others, '~' first) and numeric runs."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) and not a[i].isdigit() else 0
            bc = _order(b[j]) if j < len(b) and not b[j].isdigit() else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = (a[i] > b[j]) - (a[i] < b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(version: str) -> tuple[int, str, str]:
    epoch, colon, rest = version.partition(":")
    if not colon or not epoch.isdigit():
        epoch, rest = "0", version
    upstream, dash, revision = rest.rpartition("-")
    if not dash:
        upstream, revision = rest, ""
    return int(epoch), upstream, revision


def compare_versions(a: str, b: str) -> int:
    """Debian version order (epoch, upstream, revision) as -1, 0 or 1."""
    ea, ua, ra = _split_version(a.strip())
    eb, ub, rb = _split_version(b.strip())
    if ea != eb:
        return -1 if ea < eb else 1
    return _compare_part(ua, ub) or _compare_part(ra, rb)


def _native_architecture() -> str | None:
    try:
        proc = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return proc.stdout.strip() or None


# --------------------------------------------------------------------------------------------- build


def _is_test(name: str, test_fraction: float) -> bool:
    return int.from_bytes(hashlib.sha1(name.encode()).digest(), "big") < test_fraction * 2**160


def tokens(text: str) -> list[str]:
    return [t for t in TOKEN.findall(text.lower()) if len(t) >= 2]


def _write_atomic(path: Path, lines: Iterable[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tfidf_line(counts: Counter, vocab: dict[str, int], idf: list[float]) -> str:
    feats = {}
    for word, tf in counts.items():
        fid = vocab.get(word)
        if fid is not None and idf[fid] > 0:
            feats[fid] = (1.0 + math.log(tf)) * idf[fid]
    norm = math.sqrt(sum(v * v for v in feats.values()))
    return " ".join(f"{fid}:{feats[fid] / norm:.6g}" for fid in sorted(feats))


def build(
    out: str | os.PathLike,
    *,
    index_files: Sequence[str | os.PathLike] | None = None,
    translation_files: Sequence[str | os.PathLike] | None = None,
    long: bool | None = None,
    min_label_count: int = 2,
    test_fraction: float = 0.2,
    max_features: int = 100_000,
) -> dict:
    """Write the data set into `out`; returns the content of stats.json.

    index_files: Packages files to read (None: the machine's, from `apt-get indextargets`).
    translation_files: Translation-en files (None: the machine's when index_files is None, else none).
    long: long descriptions in the text (None: when any exist). Raises IndexMissingError without index.
    """
    start = time.monotonic()
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if min_label_count < 1 or max_features < 1:
        raise ValueError("min_label_count and max_features must be at least 1")
    if index_files is None:
        found, found_translations = find_index_files()
        index_files = found
        if translation_files is None:
            translation_files = found_translations
    index_files = [str(f) for f in index_files]
    translation_files = [str(f) for f in translation_files or []]
    if not index_files:
        raise IndexMissingError(
            f"no APT package index (Packages files) found under /var/lib/apt/lists; {RUN_APT_UPDATE}"
        )

    # ---- read every stanza, keep the best per package name
    native = _native_architecture()
    field_counts: Counter = Counter()
    best: dict[str, tuple[dict[str, str], str]] = {}
    tagged: dict[str, tuple[dict[str, str], str]] = {}  # best stanza with a Tag field, per name
    stanzas = 0

    def better(new: tuple[dict[str, str], str], old: tuple[dict[str, str], str]) -> bool:
        (nf, nfile), (of, ofile) = new, old
        by_version = compare_versions(nf.get("Version", ""), of.get("Version", ""))
        if by_version:
            return by_version > 0
        narch, oarch = nf.get("Architecture", "").strip(), of.get("Architecture", "").strip()
        nkey = (narch in (native, "all"), narch, nfile)
        okey = (oarch in (native, "all"), oarch, ofile)
        return nkey > okey

    for path in index_files:
        for fields in parse_stanzas(read_index_file(path)):
            name = fields.get("Package", "").strip()
            if not name:
                continue
            stanzas += 1
            field_counts.update(fields.keys())
            entry = (fields, path)
            if name not in best or better(entry, best[name]):
                best[name] = entry
            if "Tag" in fields and (name not in tagged or better(entry, tagged[name])):
                tagged[name] = entry
    if not best:
        raise IndexMissingError(f"the package index files hold no packages: {index_files}; {RUN_APT_UPDATE}")

    # ---- long descriptions: Translation-en by Description-md5, then by package name; or inline
    by_md5: dict[str, str] = {}
    by_name: dict[str, str] = {}
    translation_fields: Counter = Counter()
    for path in translation_files:
        for fields in parse_stanzas(read_index_file(path)):
            translation_fields.update(fields.keys())
            _, long_text = split_description(fields.get("Description-en", ""))
            if not long_text:
                continue
            md5, package = fields.get("Description-md5", "").strip(), fields.get("Package", "").strip()
            if md5:
                by_md5.setdefault(md5, long_text)
            if package:
                by_name.setdefault(package, long_text)

    rows = []
    inline_long = 0
    tags_borrowed = 0
    # Rows in a fixed pseudo-random order (by a hash of the name, another hash than the split's), not
    # alphabetically: a loader's shuffle buffer only mixes neighbours, and alphabetical neighbours
    # (lib*, python3-*) share labels, which made every batch one-sided (-2 P@1 after 5 epochs here).
    for name in sorted(best, key=lambda n: hashlib.sha1(b"order:" + n.encode()).digest()):
        fields = best[name][0]
        if "Tag" not in fields and name in tagged:  # e.g. -security and -updates indexes carry no Tag
            fields = {**fields, "Tag": tagged[name][0]["Tag"]}
            tags_borrowed += 1
        title, content = split_description(fields.get("Description", ""))
        if content:
            inline_long += 1
        else:
            content = by_md5.get(fields.get("Description-md5", "").strip(), "") or by_name.get(name, "")
        rows.append({"uid": name, "title": title, "content": content, "labels": stanza_labels(fields)})
    have_long = sum(1 for r in rows if r["content"])
    if long is None:
        long = have_long > 0
    elif long and not have_long:
        raise IndexMissingError(
            "--long asked for, but the index has no long descriptions (no Translation-en files; "
            "set Acquire::Languages to include 'en' in the APT configuration and run `apt-get update`)"
        )
    for r in rows:
        if not long:
            r["content"] = ""
        r["text"] = f"{r['title']}. {r['content']}" if r["content"] else r["title"]

    # ---- split, label filter (training counts), drop rows without labels
    train, test = [], []
    for r in rows:
        (test if _is_test(r["uid"], test_fraction) else train).append(r)
    label_freq = Counter(label for r in train for label in r["labels"])
    kept = {label for label, n in label_freq.items() if n >= min_label_count}
    dropped = {}
    for split_name, split in (("train", train), ("test", test)):
        for r in split:
            r["labels"] = [label for label in r["labels"] if label in kept]
        dropped[split_name] = sum(1 for r in split if not r["labels"])
    train = [r for r in train if r["labels"]]
    test = [r for r in test if r["labels"]]
    label_names = sorted(kept, key=lambda label: (-label_freq[label], label))
    label_id = {label: i for i, label in enumerate(label_names)}

    # ---- tf-idf vocabulary on the training rows
    train_counts = [Counter(tokens(r["text"])) for r in train]
    test_counts = [Counter(tokens(r["text"])) for r in test]
    df = Counter(word for counts in train_counts for word in counts)
    words = sorted((w for w, n in df.items() if n >= 2), key=lambda w: (-df[w], w))[:max_features]
    vocab = {w: i for i, w in enumerate(words)}
    idf = [math.log(len(train) / df[w]) for w in words]

    # ---- write
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "stats.json").unlink(missing_ok=True)  # written last: present means every file is of one build
    for split, counts, jsonl, bow in (
        (train, train_counts, "trn.jsonl", "train.txt"),
        (test, test_counts, "tst.jsonl", "test.txt"),
    ):
        keys = ("uid", "title", "content", "text", "labels")
        _write_atomic(out / jsonl, (json.dumps({k: r[k] for k in keys}, ensure_ascii=False) for r in split))
        header = f"{len(split)} {len(words)} {len(label_names)}"
        lines = (
            " ".join(
                x
                for x in (
                    ",".join(str(i) for i in sorted(label_id[n] for n in r["labels"])),
                    _tfidf_line(c, vocab, idf),
                )
                if x
            )
            for r, c in zip(split, counts, strict=True)
        )
        _write_atomic(out / bow, [header, *lines])
    _write_atomic(out / "labels.txt", label_names)
    _write_atomic(out / "vocab.txt", (f"{w}\t{df[w]}" for w in words))

    all_rows = train + test
    all_counts = train_counts + test_counts
    label_kinds = Counter(
        "section" if n.startswith("section::") else "tag" if "::" in n else "package" for n in label_names
    )
    stats = {
        "rows": len(all_rows),
        "train_rows": len(train),
        "test_rows": len(test),
        "dropped_without_labels": dropped,
        "stanzas_read": stanzas,
        "unique_packages": len(best),
        "tags_from_other_stanza": tags_borrowed,
        "labels": len(label_names),
        "label_kinds": dict(sorted(label_kinds.items())),
        "labels_before_filter": len(label_freq),
        "features": len(words),
        "mean_labels_per_row": round(sum(len(r["labels"]) for r in all_rows) / max(len(all_rows), 1), 4),
        "mean_labels_per_row_train": round(sum(len(r["labels"]) for r in train) / max(len(train), 1), 4),
        "mean_labels_per_row_test": round(sum(len(r["labels"]) for r in test) / max(len(test), 1), 4),
        "mean_words_per_row": round(sum(sum(c.values()) for c in all_counts) / max(len(all_rows), 1), 4),
        "mean_features_per_row": round(
            sum(sum(1 for w in c if w in vocab) for c in all_counts) / max(len(all_rows), 1), 4
        ),
        "rows_without_features": sum(1 for c in all_counts if not any(w in vocab for w in c)),
        "long_descriptions": long,
        "rows_with_long_description": sum(1 for r in all_rows if r["content"]),
        "inline_long_descriptions": inline_long,
        "source_files": {"packages": index_files, "translations": translation_files},
        "fields_found": dict(sorted(field_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "translation_fields_found": dict(sorted(translation_fields.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": {
            "min_label_count": min_label_count,
            "test_fraction": test_fraction,
            "max_features": max_features,
            "long": long,
        },
        "seconds": round(time.monotonic() - start, 2),
    }
    _write_atomic(out / "stats.json", json.dumps(stats, indent=2).splitlines())
    return stats


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build an XMC data set (package description -> dependencies, debtags, section) from the "
        "local APT index. Never downloads; run `apt-get update` first.",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--min-label-count", type=int, default=2, help="drop labels in fewer training rows")
    p.add_argument("--test-fraction", type=float, default=0.2, help="share of packages (by sha1 of the name)")
    p.add_argument("--max-features", type=int, default=100_000, help="vocabulary size (most frequent words)")
    p.add_argument(
        "--long",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add long descriptions (default: when the index has any, e.g. Translation-en files)",
    )
    p.add_argument("--index-file", action="append", help="Packages file to read instead of the machine's")
    p.add_argument("--translation-file", action="append", help="Translation-en file to read")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        stats = build(
            args.out,
            index_files=args.index_file,
            translation_files=args.translation_file,
            long=args.long,
            min_label_count=args.min_label_count,
            test_fraction=args.test_fraction,
            max_features=args.max_features,
        )
    except IndexMissingError as exn:
        print(f"make_debian_xmc: {exn}", file=sys.stderr)
        return 2
    except ValueError as exn:
        print(f"make_debian_xmc: {exn}", file=sys.stderr)
        return 2
    print(
        f"debian-xmc: {stats['train_rows']} train + {stats['test_rows']} test rows, "
        f"{stats['labels']} labels, "
        f"{stats['features']} features, {stats['mean_labels_per_row']} labels/row, "
        f"{stats['mean_words_per_row']} words/row, long={stats['long_descriptions']}, "
        f"{stats['seconds']} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
