"""Bad input: DataError naming file:line or shard and key, non-zero exit, no output that looks complete."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.data import DataError, convert_dense, convert_xmc, make_loader, read_manifest
from pipeline.data.shard_writer import ShardWriter

ROOT = Path(__file__).resolve().parent.parent
GOOD = ["0,1 0:1.0 3:0.5", "2 1:2", " 4:1.5", "1,3 2:0.25 5:1"]  # 4 samples, 6 features, 4 labels


def assert_no_output(out: Path) -> None:
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


@pytest.mark.parametrize(
    "lines,line,message",
    [
        (["4 6 4", *GOOD[:2], "1,x 0:1", GOOD[3]], 4, "malformed label list"),
        (["4 6 4", *GOOD[:3], "1 3-1.0"], 5, "malformed feature '3-1.0'"),
        (["4 6 4", *GOOD[:3], "1 3:abc"], 5, "malformed feature '3:abc'"),
        (["4 6 4", *GOOD[:3], "1 3.5:1"], 5, "is not an integer"),
        (["5 6 4", *GOOD], 5, "num_points=5 but the file has 4 samples"),
        (["3 6 4", *GOOD], 5, "more samples than the header"),
        (["4 6 4", *GOOD[:3], "4 1:1"], 5, "label id 4 not in [0, 4)"),
        (["4 6 4", *GOOD[:3], "1 6:1"], 5, "feature index 6 not in [0, 6)"),
        (["4 6 4", *GOOD[:3], "-1 2:1"], 5, "label id -1 not in [0, 4)"),
        (["4 6 4", *GOOD[:3], "1,-1 2:1"], 5, "label id -1 not in [0, 4)"),
        (["4 6 4", *GOOD[:3], "1 -2:1"], 5, "feature index -2 not in [0, 6)"),
        (["4 6 4", *GOOD[:3], "1 2:nan"], 5, "not a finite float32"),
        (["4 6 4", *GOOD[:3], "1 2:inf"], 5, "not a finite float32"),
        (["4 6 4", *GOOD[:3], "1 2:1e39"], 5, "not a finite float32"),
        ([], 1, "empty input"),
        (["0 6 4"], 1, "empty input"),
        (["four 6 4", *GOOD], 1, "bad header"),
        (["4 6 4", *GOOD[:2], "", *GOOD[2:]], 4, "blank line inside the data"),
    ],
)
def test_xmc_text_errors_name_file_and_line_and_leave_nothing(tmp_path, lines, line, message):
    src = tmp_path / "bad.txt"
    src.write_text("\n".join(lines) + ("\n" if lines else ""))
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        convert_xmc(src, out, shard_size=1, block_size=1, progress=False)  # shards 0..2 were already renamed
    assert err.value.file == str(src) and err.value.line == line
    assert str(err.value).startswith(f"{src}:{line}: ") and message in str(err.value)
    assert_no_output(out)


def test_cli_exits_non_zero_with_one_line_error(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_text("\n".join(["4 6 4", *GOOD[:2], "9 1:1", GOOD[3]]) + "\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.data",
            "xmc",
            "--input",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {src}:4: label id 9 not in [0, 4)"
    assert_no_output(tmp_path / "o")


def test_overwriting_a_converted_folder_removes_its_old_manifest_first(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("\n".join(["4 6 4", *GOOD]) + "\n")
    convert_xmc(src, tmp_path / "out", progress=False)
    src.write_text("\n".join(["4 6 4", *GOOD[:3], "1 9:1"]) + "\n")
    with pytest.raises(DataError):
        convert_xmc(src, tmp_path / "out", progress=False)
    assert_no_output(tmp_path / "out")


def _dense(tmp_path, emb, label_lines):
    np.save(tmp_path / "x.npy", emb)
    (tmp_path / "y.txt").write_text("".join(line + "\n" for line in label_lines))
    return tmp_path / "x.npy", tmp_path / "y.txt"


@pytest.mark.parametrize(
    "emb,labels,where,message",
    [
        (
            np.array([[1, np.nan], [0, 1], [1, 1]], np.float32),
            ["0", "1", "0"],
            "x.npy",
            "row 0 has NaN or Inf",
        ),
        (np.ones((3, 2), np.float16) * np.float16(np.inf), ["0", "1", "0"], "x.npy", "NaN or Inf"),
        (np.ones((3, 2), np.float32), ["0", "1"], "y.txt", "2 lines but"),
        (np.ones((3, 2), np.float32), ["0", "1", "2", "1"], "y.txt", "4 lines but"),
        (np.ones((3, 2), np.float32), ["0", "a,1", "0"], "y.txt:2", "malformed label list"),
        (np.ones((3, 2), np.float32), ["0", "-3", "0"], "y.txt:2", "negative label id -3"),
        (np.ones((3, 2), np.float32), ["0", "7", "0"], "y.txt:2", "label id 7 not in [0, 5)"),
        (np.ones((3, 2), np.int64), ["0", "1", "0"], "x.npy", "expected float32 or float16"),
        (np.ones(3, np.float32), ["0", "1", "0"], "x.npy", "expected a 2-d matrix"),
        (np.ones((0, 2), np.float32), [], "x.npy", "empty input"),
    ],
)
def test_dense_errors(tmp_path, emb, labels, where, message):
    x, y = _dense(tmp_path, emb, labels)
    with pytest.raises(DataError) as err:
        convert_dense(x, y, tmp_path / "out", num_labels=5, shard_size=1, block_size=1, progress=False)
    assert where in str(err.value) and message in str(err.value)
    assert_no_output(tmp_path / "out")


# -- read time ---------------------------------------------------------------------------------------
def make_shards(folder: Path, n: int = 12, nan_at: int | None = None) -> Path:
    """n BoW samples (sample i: features [i % 6, 6 + i % 4], label [i % 4]), shards of 6, blocks of 3."""
    with ShardWriter(
        folder, feature_kind="bow", num_features=10, num_labels=4, shard_size=6, block_size=3, progress=False
    ) as writer:
        for i in range(n):
            values = np.array([1.0, np.nan if i == nan_at else 0.5], np.float32)
            writer.add_bow(np.array([i % 4]), np.array([i % 6, 6 + i % 4]), values)
        writer.finish()
    return folder


def edit_manifest(folder: Path, **changes) -> None:
    doc = json.loads((folder / "manifest.json").read_text())
    doc.update(changes)
    if "num_labels" in changes:
        np.save(folder / "label_frequencies.npy", np.zeros(changes["num_labels"], np.int64))
    (folder / "manifest.json").write_text(json.dumps(doc))


def read_all(folder, workers=0, **kw):
    loader = make_loader(folder, 4, 0, 1, num_workers=workers, shuffle=False, **kw)
    return loader, list(loader)


def corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


BLOCK1 = 512 + 512  # tar: header + block 0 (132 bytes padded to 512), then the header of block 1


@pytest.mark.parametrize(
    "damage,key,message",
    [
        (lambda p: corrupt(p, 512 + 60, b"\xff\xfe"), "0000000006", "checksum mismatch"),
        (lambda p: corrupt(p, BLOCK1, b"\x00garbage"), None, "shard ends after 3 samples"),
        (
            lambda p: p.write_bytes(p.read_bytes()[: BLOCK1 + 512 + 100]),
            "after 0000000006",
            "unreadable shard (ReadError: unexpected end of data",
        ),
        (lambda p: corrupt(p, 512, b"JUNK"), "0000000006", "bad magic"),
        (
            lambda p: p.write_bytes(b"this is not a tar file" * 100),
            "(before the first key)",
            "unreadable shard",
        ),
        (lambda p: p.unlink(), "(before the first key)", "unreadable shard (FileNotFoundError"),
    ],
)
@pytest.mark.parametrize("workers", [0, 2])
def test_damaged_shard_names_shard_and_key(tmp_path, damage, key, message, workers):
    folder = make_shards(tmp_path / "d")
    damage(folder / "shard-000001.tar")
    with pytest.raises(DataError) as err:
        read_all(folder, workers)
    assert err.value.shard == f"{folder}/shard-000001.tar" and message in str(err.value)
    if key is not None:
        assert err.value.key == key
    assert str(err.value).startswith(f"shard {folder}/shard-000001.tar")


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"num_labels": 3}, "key 0000000003: sample 3: label id 3 not in [0, 3)"),
        ({"num_features": 8}, "key 0000000000: sample 2: feature index 8 not in [0, 8)"),
    ],
)
def test_ids_outside_the_manifest_dimensions_at_read_time(tmp_path, changes, message):
    folder = make_shards(tmp_path / "d")
    edit_manifest(folder, **changes)
    with pytest.raises(DataError, match="shard .*shard-000000.tar, " + re.escape(message)):
        read_all(folder)


def test_nan_value_at_read_time(tmp_path):
    folder = make_shards(tmp_path / "d", nan_at=7)
    with pytest.raises(DataError, match=r"shard-000001.tar, key 0000000006: sample 7: feature value is NaN"):
        read_all(folder)


def test_skip_policy_counts_bad_samples_and_keeps_ranks_equal(tmp_path, caplog):
    folder = make_shards(tmp_path / "d", n=24, nan_at=7)
    corrupt(folder / "shard-000002.tar", 512 + 60, b"\xff\xfe")  # block of samples 12..14
    (folder / "shard-000003.tar").write_bytes(
        (folder / "shard-000003.tar").read_bytes()[: BLOCK1 + 512 + 100]
    )
    caplog.set_level(logging.WARNING)
    valid, lens = [], []
    for rank in range(2):
        loader = make_loader(folder, 4, rank, 2, num_workers=2, shuffle=False, bad_samples="skip")
        got = list(loader)
        lens.append((len(loader), len(got)))
        valid += [int(i) for b in got for i in b.sample_ids[b.valid]]
        if rank == 1:
            assert loader.skipped == 3 + 3  # corrupt block 12..14 and samples 21..23 after the truncation
        else:
            assert loader.skipped == 1  # the NaN sample
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1]
    assert sorted(valid) == sorted(set(range(24)) - {7, 12, 13, 14, 21, 22, 23})
    assert "rank 1 epoch 0: skipped 6 bad samples" in caplog.text  # per-sample warnings come from the workers


def test_manifest_problems(tmp_path):
    folder = make_shards(tmp_path / "d")
    with pytest.raises(DataError, match=r"manifest.json: num_labels=4 but the configuration expects 5"):
        make_loader(folder, 4, 0, 1, expected=(10, 5))
    with pytest.raises(DataError, match=r"num_features=10 but the configuration expects 11"):
        read_manifest(folder).check(num_features=11)
    make_loader(folder, 4, 0, 1, expected=(10, 4))  # agrees
    with pytest.raises(DataError, match=r"no manifest.json"):
        make_loader(tmp_path / "nothing", 4, 0, 1)
    edit_manifest(folder, num_samples=13)
    with pytest.raises(DataError, match=r"shards hold 12 samples but num_samples=13"):
        read_manifest(folder)
    edit_manifest(folder, num_samples=12, format_version=99)
    with pytest.raises(DataError, match=r"format_version 99 is not supported"):
        read_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON"):
        read_manifest(folder)
    with pytest.raises(DataError, match=r"shard 'shard-000009.tar' is not listed in the manifest"):
        make_loader(f"{make_shards(tmp_path / 'e')}/shard-000009.tar", 4, 0, 1)
