"""Checkpoint integrity on 2 real gloo ranks, without a model: the file records of meta.json, the
choice of the checkpoint to resume from, and a write that fails.

`write_checkpoint` with a backbone writer that writes one file per rank (as DeepSpeed's engine does):
every file of the folder is recorded with its size and sha256, hashed by the ranks in shares;
`resume_point` passes over damaged checkpoints (cut short, altered, a file missing) to the newest
intact one, and refuses a damaged explicit one naming the file; a checkpoint written before files
were recorded is taken as it is; a write that fails names the file and leaves no torn folder.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pipeline.parallel.grid import build_grid
from pipeline.train import checkpoint as ckpt
from tests.multiproc import run_ranks


def _writer(folder: Path) -> None:
    rank = dist.get_rank()
    (folder / "backbone").mkdir(exist_ok=True)
    torch.save({"part": torch.full((100,), float(rank))}, folder / "backbone" / f"part{rank}.pt")


def _write_three(rank: int, world: int, root: str) -> list[str]:
    grid = build_grid(1)
    out = []
    for step in (2, 4, 6):
        shard = {"head": {"w": torch.arange(10.0) + step + rank}}
        out.append(str(ckpt.write_checkpoint(Path(root), step, grid, _writer, shard, {"num_labels": 10})))
    return out


def _resume(rank: int, world: int, root: str, path: str | None) -> tuple[str | None, list[str]]:
    grid = build_grid(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            chosen = ckpt.resume_point(Path(root), grid, Path(path) if path else None)
        except ckpt.CheckpointError as e:
            return f"error: {e}", []
    return (str(chosen) if chosen else None), [str(w.message) for w in caught]


def _fail_write(rank: int, world: int, root: str) -> str:
    grid = build_grid(1)
    shard = {"head": {"w": torch.zeros(3)}}

    def broken(folder: Path) -> None:
        if dist.get_rank() == 1:
            (folder / "backbone.pt").mkdir()  # a folder where the file goes: the save fails
            ckpt._atomic_save({"x": 1}, folder / "backbone.pt")

    try:
        ckpt.write_checkpoint(Path(root), 8, grid, broken, shard, {"num_labels": 10})
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "written"


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkpoints")
    run_ranks(2, _write_three, str(root))
    return root


@pytest.fixture()
def written(template, tmp_path) -> list[Path]:
    """Checkpoints of steps 2, 4 and 6 written by 2 ranks (a fresh copy for each test)."""
    shutil.copytree(template, tmp_path / "checkpoints")
    return sorted((tmp_path / "checkpoints").iterdir())


def test_every_file_is_recorded_with_its_size_and_checksum(written):
    meta = json.loads((written[-1] / "meta.json").read_text())
    assert sorted(meta["files"]) == [
        "backbone/part0.pt",
        "backbone/part1.pt",
        "head/rank00000.pt",
        "head/rank00001.pt",
    ]
    for name, record in meta["files"].items():
        assert record == ckpt.file_record(written[-1] / name)
    assert [p.name for p in written] == ["step00000002", "step00000004", "step00000006"]  # keep=None: all
    ckpt.verify_files(written[-1])


def test_resume_passes_over_damaged_checkpoints_to_the_newest_intact(written):
    step4, step6 = written[1], written[2]
    cut = step6 / "head" / "rank00001.pt"
    cut.write_bytes(cut.read_bytes()[:-7])
    flipped = step4 / "backbone" / "part0.pt"
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 1
    flipped.write_bytes(bytes(raw))
    results = run_ranks(2, _resume, str(step6.parent), None)
    chosen, messages = results[0]
    assert results[1][0] == chosen == str(written[0])  # every rank takes the same one
    assert any(
        f"skipping damaged checkpoint step00000006: {cut}:" in m and "meta.json records" in m
        for m in messages
    )
    assert any(f"skipping damaged checkpoint step00000004: {flipped}: sha256 differs" in m for m in messages)


def test_an_explicit_damaged_checkpoint_is_refused_naming_the_file(written):
    missing = written[-1] / "backbone" / "part1.pt"
    missing.unlink()
    chosen, _ = run_ranks(2, _resume, str(written[-1].parent), str(written[-1]))[0]
    assert chosen == f"error: cannot resume from {written[-1]}: {missing}: missing"


def test_a_checkpoint_without_file_records_is_taken_as_it_is(written):
    meta_file = written[-1] / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    (written[-1] / "head" / "rank00000.pt").write_bytes(b"not checked")
    chosen, messages = run_ranks(2, _resume, str(written[-1].parent), None)[0]
    assert chosen == str(written[-1]) and messages == []


def test_a_failed_write_names_the_file_and_leaves_no_torn_folder(written):
    root = written[-1].parent
    results = run_ranks(2, _fail_write, str(root))
    assert results[1].startswith(
        f"CheckpointError: writing {root / '.tmp-step00000008' / 'backbone.pt'} failed"
    )
    assert "KiB free on that file system" in results[1]
    assert results[0] != "written"  # rank 0 learns of it in its next collective
    assert sorted(p.name for p in root.iterdir()) == [p.name for p in written]
