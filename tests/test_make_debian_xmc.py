"""launch/make_debian_xmc.py on the machine's real APT index, plus its parsers on literal stanzas."""

from __future__ import annotations

import gzip
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest

from launch.make_debian_xmc import (
    IndexMissingError,
    build,
    compare_versions,
    find_index_files,
    main,
    parse_stanzas,
    stanza_labels,
)
from pipeline.data import convert_xmc

MAX_FEATURES = 2000
MIN_COUNT = 2

STANZA = """\
Package: demo
Version: 1:2.0-1
Architecture: amd64
Pre-Depends: dpkg (>= 1.19)
Depends: libc6 (>= 2.34), python3:any, gpgv | gpgv2 (>= 2.1) | gpgv1:amd64, libfoo [amd64],
 perl:any (>= 5.36), libc6 (<< 3)
Recommends: ca-certificates,
 wget | curl
Suggests: not-a-label
Description: demo tool for tests
Description-md5: 0123456789abcdef0123456789abcdef
Tag: admin::package-management, devel::lang:ruby,
 role::program, suite::debian
Section: contrib/admin
"""


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _bow(path: Path) -> tuple[list[int], list[tuple[list[int], dict[int, float]]]]:
    lines = path.read_text().splitlines()
    header = [int(x) for x in lines[0].split()]
    rows = []
    for line in lines[1:]:
        assert "  " not in line and not line.endswith(" "), "one space between fields"
        tokens = line.split(" ")
        labels = [int(x) for x in tokens[0].split(",")]
        feats = {int(f.split(":")[0]): float(f.split(":")[1]) for f in tokens[1:]}
        assert list(feats) == sorted(feats), "features sorted by index"
        rows.append((labels, feats))
    return header, rows


# ----------------------------------------------------------------------------- parsers (literal data)


def test_stanza_labels_literal():
    (fields,) = list(parse_stanzas(STANZA))
    assert fields["Package"] == "demo"
    assert stanza_labels(fields) == sorted(
        [
            "libc6",
            "python3",
            "gpgv",
            "gpgv2",
            "gpgv1",
            "libfoo",
            "perl",
            "ca-certificates",
            "wget",
            "curl",
            "admin::package-management",
            "devel::lang:ruby",
            "role::program",
            "suite::debian",
            "section::contrib/admin",
        ]
    )


def test_compare_versions():
    assert compare_versions("1:1.0", "2.0") > 0
    assert compare_versions("1.0~rc1", "1.0") < 0
    assert compare_versions("1.10", "1.9") > 0
    assert compare_versions("2.36-9+deb12u14", "2.36-9+deb12u13") > 0
    assert compare_versions("1.0-1", "1.0-1") == 0
    assert compare_versions("1.0a", "1.0+") < 0


def test_literal_index_dedup_long_and_missing(tmp_path):
    """Two suites (one gzip-compressed), a Translation-en file, and the missing-index errors."""
    rows = []
    for i in range(40):
        rows.append(
            f"Package: pkg{i}\nVersion: 1.0-1\nArchitecture: amd64\nDepends: libc6, libcommon{i % 3}\n"
            f"Description: tool number {i} for common work\nDescription-md5: md5-{i}\n"
            f"Tag: role::program\nSection: utils\n"
        )
    main_file = tmp_path / "main_Packages"
    main_file.write_text("\n".join(rows))
    security = tmp_path / "security_Packages.gz"  # a newer pkg0 without Tag, like bookworm-security
    with gzip.open(security, "wt") as f:
        f.write("Package: pkg0\nVersion: 1.0-1+deb12u1\nArchitecture: amd64\nDepends: libc6, libnew\n")
        f.write("Description: tool number 0 for common work\nDescription-md5: md5-0\nSection: utils\n")
    translation = tmp_path / "Translation-en"
    translation.write_text(
        "Package: pkg0\nDescription-md5: md5-0\nDescription-en: tool number 0\n long text\n .\n of pkg0\n\n"
        "Package: pkg1\nDescription-md5: other\nDescription-en: tool number 1\n by name\n"
    )
    stats = None
    for k, order in enumerate(([main_file, security], [security, main_file])):
        out = tmp_path / f"out{k}"
        stats = build(out, index_files=order, translation_files=[translation], max_features=50)
        rows_out = {r["uid"]: r for name in ("trn.jsonl", "tst.jsonl") for r in _jsonl(out / name)}
        assert len(rows_out) == 40 and stats["unique_packages"] == 40 and stats["stanzas_read"] == 41
        pkg0 = rows_out["pkg0"]
        assert pkg0["content"] == "long text of pkg0"
        assert pkg0["text"] == "tool number 0 for common work. long text of pkg0"
        assert "role::program" in pkg0["labels"]  # Tag borrowed from the older stanza
        assert "libcommon0" not in pkg0["labels"]  # the newer stanza's Depends, whatever the file order
        assert rows_out["pkg1"]["content"] == "by name"
        assert rows_out["pkg2"]["content"] == "" and rows_out["pkg2"]["text"] == rows_out["pkg2"]["title"]
    assert stats["long_descriptions"] is True

    with pytest.raises(IndexMissingError, match="apt-get update"):
        build(tmp_path / "none", index_files=[])
    with pytest.raises(IndexMissingError, match="apt-get update"):
        build(tmp_path / "none", index_files=[tmp_path / "no_such_Packages.lz4"])
    with pytest.raises(IndexMissingError, match="Translation-en"):
        build(tmp_path / "none", index_files=[main_file], long=True)
    assert not (tmp_path / "none" / "stats.json").exists()


def test_main_missing_index_exits_nonzero(tmp_path, capsys):
    rc = main(["--out", str(tmp_path / "o"), "--index-file", str(tmp_path / "missing_Packages")])
    assert rc != 0
    assert "apt-get update" in capsys.readouterr().err
    assert not (tmp_path / "o" / "stats.json").exists()


# ----------------------------------------------------------------------------- the machine's real index


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory):
    packages, translations = find_index_files()
    assert packages, "no APT package index on this machine: setup.sh runs `apt-get update`"
    root = tmp_path_factory.mktemp("debian_xmc")
    first = build(root / "a", max_features=MAX_FEATURES, min_label_count=MIN_COUNT)
    # A second build from other input: the smaller index files (all but the largest, e.g. -security and
    # -updates), in reverse order. Every package's split must stay the same.
    smaller = sorted(packages, key=lambda f: Path(f).stat().st_size)[:-1] or packages
    build(root / "b", index_files=smaller[::-1], translation_files=translations, max_features=MAX_FEATURES)
    yield root, first
    shutil.rmtree(root, ignore_errors=True)


def test_split_disjoint_and_stable(real_sets):
    root, stats = real_sets
    a_trn, a_tst = _jsonl(root / "a" / "trn.jsonl"), _jsonl(root / "a" / "tst.jsonl")
    train_ids, test_ids = {r["uid"] for r in a_trn}, {r["uid"] for r in a_tst}
    assert len(train_ids) == len(a_trn) and len(test_ids) == len(a_tst), "one row per package"
    assert not train_ids & test_ids
    assert stats["train_rows"] == len(a_trn) > 1000 and stats["test_rows"] == len(a_tst) > 100
    assert 0.15 < len(a_tst) / (len(a_trn) + len(a_tst)) < 0.25
    b_train = {r["uid"] for r in _jsonl(root / "b" / "trn.jsonl")}
    b_test = {r["uid"] for r in _jsonl(root / "b" / "tst.jsonl")}
    assert b_train | b_test, "the second build has rows"
    assert not (b_train & test_ids) and not (b_test & train_ids), "a package changed split between builds"
    assert not list((root / "a").glob(".*tmp*")), "no temporary files left"


def test_labels_consistent_between_jsonl_and_bow(real_sets):
    root, stats = real_sets
    labels = (root / "a" / "labels.txt").read_text().splitlines()
    assert len(labels) == len(set(labels)) == stats["labels"]
    for jsonl, bow in (("trn.jsonl", "train.txt"), ("tst.jsonl", "test.txt")):
        rows = _jsonl(root / "a" / jsonl)
        header, bow_rows = _bow(root / "a" / bow)
        assert header == [len(rows), stats["features"], len(labels)]
        assert len(bow_rows) == len(rows)
        for row, (ids, _) in zip(rows, bow_rows, strict=True):
            assert row["labels"] and row["labels"] == sorted(row["labels"])
            assert sorted(labels[i] for i in ids) == row["labels"], row["uid"]
            assert row["text"] == (f"{row['title']}. {row['content']}" if row["content"] else row["title"])

    counts = Counter(label for r in _jsonl(root / "a" / "trn.jsonl") for label in r["labels"])
    assert set(counts) == set(labels)
    assert min(counts.values()) >= MIN_COUNT
    frequencies = [counts[label] for label in labels]
    assert frequencies == sorted(frequencies, reverse=True), "ids by descending training frequency"
    assert any(label.startswith("section::") for label in labels)


def test_tfidf_rows_unit_norm(real_sets):
    root, stats = real_sets
    assert 0 < stats["features"] <= MAX_FEATURES
    for bow in ("train.txt", "test.txt"):
        _, rows = _bow(root / "a" / bow)
        nonempty = [feats for _, feats in rows if feats]
        assert len(nonempty) > 0.9 * len(rows)
        for feats in nonempty:
            assert max(feats) < stats["features"]
            assert math.isclose(math.sqrt(sum(v * v for v in feats.values())), 1.0, abs_tol=1e-4)


def test_bow_files_parse_with_project_reader(real_sets, tmp_path):
    root, stats = real_sets
    labels = (root / "a" / "labels.txt").read_text().splitlines()
    for bow, rows in (("train.txt", stats["train_rows"]), ("test.txt", stats["test_rows"])):
        manifest = convert_xmc(root / "a" / bow, tmp_path / bow, shard_size=20_000, progress=False)
        assert manifest.num_samples == rows
        assert manifest.num_labels == len(labels)
        assert manifest.num_features == stats["features"]
