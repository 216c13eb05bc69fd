"""Checkpoints that are either complete or absent: the one module that knows their layout.

Layout of one checkpoint, `<output_dir>/checkpoints/step00000100/`:
    backbone/            DeepSpeed's own checkpoint of the backbone engine (tag `backbone`)
    backbone.pt          the backbone's full weights (rank 0), so inference runs at any world size;
                         with a sparse bag (`model.sparse_bag`) the table outside the engine is merged
                         in as `bag.weight`, so the file is the same as without it
    sparse_bag.pt        only with a sparse bag (rank 0, the table is replicated): its lazy-Adam state
                         (`exp_avg`, `exp_avg_sq`, `row_steps`); the table itself is `bag.weight` of
                         backbone.pt, stored once
    head/rank00003.pt    one per rank: its head shard, head optimizer state (by parameter name), RNG
                         states, and what the trainer adds (scheduler, exchange residuals, data position)
    meta.json            written last; step, world size, model-parallel size, what the caller adds,
                         and `files`: every other file's size and sha256
One write path (`write_checkpoint`): everything goes under `.tmp-step...`, `meta.json` last, and rank 0
renames the folder once every rank has finished, so a crash or Ctrl-C mid-write leaves the previous
checkpoint intact and the torn one invisible; the newest `keep` are kept. A write that fails (disk
full, permission) raises CheckpointError naming the file, and the torn folder is removed. One read
path: `resume_point` (the newest checkpoint whose files match meta.json, falling back past damaged
ones), `read_meta`, `load_rank_state` (this rank's shard, or one re-cut from another split's shards)
for resuming, and `load_for_inference` (full backbone + this rank's head, its files verified) for
predict, recovery and export.

Resuming with another model-parallel size reshards the head: the label-sharded tensors of the old
shards (and their Adam moments) are concatenated and cut to the new label range.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import RunConfig, load_config
from pipeline.data import Manifest, read_manifest
from pipeline.data.tokenizer import TextTokenizer
from pipeline.models.build import (
    build_backbone,
    build_head,
    build_tokenizer,
    head_label_range,
    sharded_state_keys,
)
from pipeline.models.neighbours import NeighbourVotes
from pipeline.models.sparse_bag import SparseBag
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.label_range import LabelRange

SPARSE_BAG = "sparse_bag.pt"
META = "meta.json"

BackboneWriter = Callable[[Path], None]
"""Writes `backbone/` and `backbone.pt` into a checkpoint folder; called on every rank (may be a
collective)."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used here (missing, incomplete, damaged, or written for another
    model), or one that could not be written."""


# ----- where checkpoints are ----------------------------------------------------------------------


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _complete(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("step*") if (p / META).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (one with meta.json), or None."""
    done = _complete(root)
    return done[-1] if done else None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) from either of them; the run folder holds `config.json`."""
    path = Path(path)
    if (path / META).is_file():
        return path, path.parent.parent
    found = latest_checkpoint(checkpoint_root(path))
    if found is None:
        raise CheckpointError(f"no complete checkpoint under {path}")
    return found, path


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / META
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    try:
        return json.loads(meta_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{meta_file}: not valid JSON ({e}): the checkpoint is damaged") from e


# ----- integrity ----------------------------------------------------------------------------------

_HASH_CHUNK = 1 << 22


def file_record(path: Path) -> dict[str, Any]:
    """{"size": bytes, "sha256": hex} of one file (reads it once, 4 MiB at a time)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def _listed_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != META)


def file_problem(folder: Path, name: str, want: dict[str, Any], record: str = META) -> str | None:
    """Why `folder/name` does not match `want` (its `file_record` as the file `record` holds it), or
    None when it does."""
    path = folder / name
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != want["size"]:
        return f"{path}: {size} bytes, {record} records {want['size']} (cut short or overwritten)"
    if file_record(path)["sha256"] != want["sha256"]:
        return f"{path}: sha256 differs from the one {record} records (the file is damaged)"
    return None


def verify_files(path: Path, names: list[str] | None = None) -> None:
    """Check `names` (all recorded files when None) of checkpoint `path` against meta.json in this
    process; CheckpointError naming the first damaged file. Checkpoints written before meta.json
    recorded files pass unchecked."""
    files = read_meta(path).get("files")
    if files is None:
        return
    for name in files if names is None else names:
        if name not in files:
            raise CheckpointError(f"{path / name}: not recorded in {path / META}")
        if problem := file_problem(path, name, files[name]):
            raise CheckpointError(problem)


def _collective_problems(path: Path, grid: ProcessGrid) -> list[str]:
    """Every rank checks every world_size-th recorded file of `path`; the problems found by all ranks
    (the same list everywhere). A folder without meta.json is one problem."""
    try:
        files = read_meta(path).get("files") or {}
        names = sorted(files)[grid.rank :: grid.world_size]
        found = [p for n in names if (p := file_problem(path, n, files[n]))]
    except (CheckpointError, ValueError) as e:
        found = [str(e)]
    gathered: list[list[str]] = [[] for _ in range(grid.world_size)]
    dist.all_gather_object(gathered, found)
    return sorted({p for ps in gathered for p in ps})


def resume_point(root: Path, grid: ProcessGrid, path: Path | None = None) -> Path | None:
    """The checkpoint to resume from, its files verified against meta.json by all ranks together
    (collective). With `path`: that checkpoint, or CheckpointError naming its damaged file. Without:
    the newest complete checkpoint under `root` whose files are intact, warning with the damaged
    file for each newer one passed over; None when there is none."""
    if path is not None:
        if problems := _collective_problems(path, grid):
            raise CheckpointError(f"cannot resume from {path}: {problems[0]}")
        return path
    for candidate in reversed(_complete(root)):
        problems = _collective_problems(candidate, grid)
        if not problems:
            return candidate
        if grid.rank == 0:
            warnings.warn(f"skipping damaged checkpoint {candidate.name}: {problems[0]}", stacklevel=2)
    return None


# ----- RNG ----------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


# ----- writing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _writing(what: Path | str) -> Iterator[None]:
    """A failed write (disk full, permission, ...) as a CheckpointError naming what was written."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, RuntimeError) as e:
        if isinstance(e, dist.DistBackendError):  # a peer went away: not a write failure
            raise
        raise CheckpointError(
            f"writing {what} failed: {type(e).__name__}: {e}{_free_space(Path(what))}"
        ) from e


def _free_space(path: Path) -> str:
    """' (N KiB free on that file system)': torch's own error for a full disk does not say so."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f" ({shutil.disk_usage(path).free // 1024} KiB free on that file system)"
    except OSError:
        return ""


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    with _writing(path):
        torch.save(obj, tmp)
        os.replace(tmp, path)


def head_shard(head: nn.Module, optimizer: torch.optim.Optimizer | None, **extra: Any) -> dict[str, Any]:
    """This rank's head file: the head's state, its optimizer state keyed by parameter name (so it
    survives resharding), this process's RNG states, and `extra`."""
    names = {id(p): n for n, p in head.named_parameters()}
    by_name = {} if optimizer is None else {names[id(p)]: dict(s) for p, s in optimizer.state.items()}
    return {"head": head.state_dict(), "optimizer": by_name, "rng": rng_state(), **extra}


def engine_backbone(engine, bag: SparseBag | None = None) -> BackboneWriter:
    """The backbone of a DeepSpeed engine: its own checkpoint, and the full weights on rank 0 (a
    collective under ZeRO-3, where parameters are partitioned). With `bag` (the table outside the
    engine, identical on every rank) rank 0 merges its table into the full weights as `bag.weight` and
    writes its optimizer state to `sparse_bag.pt`."""

    def write(folder: Path) -> None:
        with _writing(folder / "backbone"):
            engine.save_checkpoint(str(folder / "backbone"), tag="backbone", save_latest=False)
        if engine.zero_optimization_stage() == 3:
            weights = engine._zero3_consolidated_16bit_state_dict()
        else:
            weights = engine.module.state_dict() if dist.get_rank() == 0 else None
        if dist.get_rank() == 0:
            if bag is not None:
                state = {k: v.cpu() for k, v in bag.state_dict().items()}
                weights = {"bag.weight": state.pop("weight"), **weights}  # the key order of a plain backbone
                _atomic_save(state, folder / SPARSE_BAG)
            _atomic_save(weights, folder / "backbone.pt")

    return write


def copied_backbone(source: Path) -> BackboneWriter:
    """The backbone of another checkpoint, copied as it is (rank 0)."""

    def write(folder: Path) -> None:
        if dist.get_rank() == 0:
            verify_files(source, ["backbone.pt", *([SPARSE_BAG] if (source / SPARSE_BAG).is_file() else [])])
            shutil.copytree(source / "backbone", folder / "backbone")
            shutil.copy2(source / "backbone.pt", folder / "backbone.pt")
            if (source / SPARSE_BAG).is_file():
                shutil.copy2(source / SPARSE_BAG, folder / SPARSE_BAG)

    return write


def write_checkpoint(
    root: Path,
    step: int,
    grid: ProcessGrid,
    backbone: BackboneWriter,
    shard: dict[str, Any],
    meta: dict[str, Any],
    keep: int | None = None,
) -> Path:
    """Write checkpoint `step` under `root` on every rank (collective): the backbone, this rank's
    `shard` (see `head_shard`), the size and sha256 of every file (each rank hashes a share), then
    meta.json (`meta` plus step, grid sizes and files), then the rename. Keeps the newest `keep`
    complete checkpoints (all when None). Returns the final path.

    A write that fails raises CheckpointError on the rank it failed on, naming the file; the others
    then fail in their next collective. Rank 0 removes the torn `.tmp-step...` folder either way (and
    any left by an earlier crash), so only complete checkpoints are ever seen."""
    final = root / f"step{step:08d}"
    tmp = root / f".tmp-step{step:08d}"
    try:
        if grid.rank == 0:
            for torn in root.glob(".tmp-step*"):
                shutil.rmtree(torn, ignore_errors=True)
            with _writing(tmp / "head"):
                (tmp / "head").mkdir(parents=True)
        dist.barrier()
        backbone(tmp)
        _atomic_save(shard, tmp / "head" / f"rank{grid.rank:05d}.pt")
        dist.barrier()
        names = _listed_files(tmp) if grid.rank == 0 else None
        shared = [names]
        dist.broadcast_object_list(shared, src=0)
        mine = {n: file_record(tmp / n) for n in shared[0][grid.rank :: grid.world_size]}
        records: list[dict[str, Any]] = [{} for _ in range(grid.world_size)]
        dist.all_gather_object(records, mine)
        if grid.rank == 0:
            files = {n: r[n] for r in records for n in r}
            meta = {**meta, "step": step, "world_size": grid.world_size, "model_parallel": grid.mp}
            meta["files"] = dict(sorted(files.items()))
            with _writing(tmp / META):
                (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in _complete(root)[:-keep] if keep else []:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
    except BaseException:
        if grid.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ----- reading ------------------------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def reshard_head_state(
    shards: list[dict[str, Any]], head: nn.Module, label_range: LabelRange
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Head state_dict and by-name optimizer state for `label_range`, cut from another split's shards
    (those of one model-parallel group, in label order)."""
    sharded = sharded_state_keys(head, label_range.size)

    def cut(key: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        unit = sharded[key]  # labels per row: the shards start at multiples of it
        return torch.cat(tensors)[label_range.start // unit : -(-label_range.stop // unit)]

    state = {}
    for key, value in shards[0]["head"].items():
        state[key] = cut(key, [s["head"][key] for s in shards]) if key in sharded else value
    optimizer: dict[str, dict[str, Any]] = {}
    for name, entry in shards[0]["optimizer"].items():
        optimizer[name] = {
            k: cut(name, [s["optimizer"][name][k] for s in shards])
            if name in sharded and torch.is_tensor(v) and v.dim()
            else v
            for k, v in entry.items()
        }
    return state, optimizer


def head_files_read(meta: dict[str, Any], grid: ProcessGrid) -> list[str]:
    """The head files `load_rank_state` reads for this rank: its own (same grid), else the writer's
    model-parallel group 0."""
    if meta["world_size"] == grid.world_size and meta["model_parallel"] == grid.mp:
        return [f"head/rank{grid.rank:05d}.pt"]
    return [f"head/rank{r:05d}.pt" for r in range(meta["model_parallel"])]


def load_rank_state(path: Path, grid: ProcessGrid, head: nn.Module) -> dict[str, Any]:
    """This rank's head file for `head` (built for this rank's label range).

    Written by the same grid: this rank's own file, with `own` True. Written by another split: the
    shards of the writer's model-parallel group 0 re-cut to `head.label_range` (head and optimizer
    state), the other entries taken from the writer's rank 0, and `own` False: per-rank entries (RNG
    states, residuals) are then not this rank's."""
    meta = read_meta(path)
    files = head_files_read(meta, grid)
    if meta["world_size"] == grid.world_size and meta["model_parallel"] == grid.mp:
        return {**_load(path / files[0]), "own": True}
    shards = [_load(path / f) for f in files]
    state, optimizer = reshard_head_state(shards, head, head.label_range)
    return {**shards[0], "head": state, "optimizer": optimizer, "own": False}


def restore_head(head: nn.Module, optimizer: torch.optim.Optimizer | None, state: dict[str, Any]) -> None:
    """Load `load_rank_state`'s head and optimizer entries into `head` and `optimizer`."""
    head.load_state_dict(state["head"])
    if optimizer is None:
        return
    params = dict(head.named_parameters())
    for name, entry in state["optimizer"].items():
        p = params[name]
        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in entry.items()}


def to_universal(deepspeed_folder: Path, out: Path) -> None:
    """DeepSpeed's universal form of one engine checkpoint (`ds_to_universal`, in this process):
    `out/zero/<parameter>/{fp32,exp_avg,exp_avg_sq,step}.pt`, every tensor whole, whatever the
    writer's partitioning. Checkpoints written without DeepSpeed's universal-checkpoint record get
    its default one."""
    from deepspeed.checkpoint.ds_to_universal import main as convert

    args = argparse.Namespace(
        input_folder=str(deepspeed_folder),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with _writing(out), contextlib.redirect_stdout(io.StringIO()):
        convert(args)


def universal_backbone(path: Path, grid: ProcessGrid) -> Path:
    """The backbone's DeepSpeed checkpoint in `path`, converted by rank 0 to the universal form
    (`to_universal`) into `<root>/.universal-<step>/backbone`, which an engine of any data-parallel
    size loads (collective). The caller removes it after loading (`drop_universal`)."""
    target = path.parent / f".universal-{path.name}"
    if grid.rank == 0:
        shutil.rmtree(target, ignore_errors=True)
        to_universal(path / "backbone" / "backbone", target / "backbone")
    dist.barrier()
    return target


def drop_universal(target: Path, grid: ProcessGrid) -> None:
    dist.barrier()
    if grid.rank == 0:
        shutil.rmtree(target, ignore_errors=True)


def load_backbone_engine(
    engine, path: Path, bag: SparseBag | None = None, grid: ProcessGrid | None = None
) -> None:
    """The DeepSpeed checkpoint of the backbone (parameters, optimizer, scheduler) into `engine`, and
    with `bag` the table (`bag.weight` of backbone.pt) and its lazy-Adam state into `bag`. With
    `grid` (another world size than the writer's; the engine built with `load_universal`) through
    the universal form (`universal_backbone`). A checkpoint written with the other
    `model.sparse_bag` setting is refused (its engine holds other parameters)."""
    written_sparse = (path / SPARSE_BAG).is_file()
    if written_sparse != (bag is not None):
        raise CheckpointError(
            f"{path} was written with model.sparse_bag={str(written_sparse).lower()}, this run has "
            f"model.sparse_bag={str(bag is not None).lower()}: resume with the same setting"
        )
    if grid is None:
        engine.load_checkpoint(str(path / "backbone"), tag="backbone")
    else:
        universal = universal_backbone(path, grid)
        engine.load_checkpoint(str(universal), tag="backbone")
        drop_universal(universal, grid)
    if bag is not None:
        full = torch.load(path / "backbone.pt", map_location="cpu", weights_only=True, mmap=True)
        moments = torch.load(path / SPARSE_BAG, map_location="cpu", weights_only=True)
        bag.load_state_dict({"weight": full["bag.weight"], **moments})


@dataclass
class InferenceModel:
    """A trained model for this rank: the full backbone and the head for its label range."""

    config: RunConfig
    meta: dict[str, Any]
    manifest: Manifest  # of the training set: feature space, label frequencies
    backbone: nn.Module
    head: nn.Module
    label_range: LabelRange
    checkpoint: Path
    shard: dict[str, Any]
    tokenizer: TextTokenizer | None  # the loader's tokenizer for text shards and raw text
    neighbours: NeighbourVotes | None = None  # the training set's votes (a bundle's; predict.py builds them)


def load_for_inference(
    path: str | Path, grid: ProcessGrid, device: torch.device | str = "cpu"
) -> InferenceModel:
    """The model of a run folder's newest checkpoint (or of one checkpoint folder) for `grid`, at any
    world size: every rank gets the full backbone and the head cut to its model-parallel label range,
    both on `device` in eval mode."""
    checkpoint, run_dir = resolve_checkpoint(path)
    config = load_config(run_dir / "config.json")
    meta = read_meta(checkpoint)
    verify_files(checkpoint, ["backbone.pt", *head_files_read(meta, grid)])
    manifest = read_manifest(config.data.train)
    label_range = head_label_range(config.model, meta["num_labels"], grid.mp, grid.mp_rank)
    backbone = build_backbone(config.model, manifest.feature_kind, manifest.num_features)
    weights = torch.load(checkpoint / "backbone.pt", map_location="cpu", weights_only=True)
    backbone.load_state_dict(weights)
    head = build_head(config.model, label_range, seed=config.train.seed)
    shard = load_rank_state(checkpoint, grid, head)
    restore_head(head, None, shard)
    backbone.to(device).eval()
    head.to(device).eval()
    tokenizer = build_tokenizer(config.model)
    return InferenceModel(config, meta, manifest, backbone, head, label_range, checkpoint, shard, tokenizer)
