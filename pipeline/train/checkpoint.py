"""Checkpoints that are either complete or absent.

Layout of one checkpoint, `<output_dir>/checkpoints/step00000100/`:
    backbone/            DeepSpeed's own checkpoint of the backbone engine (tag `backbone`)
    backbone.pt          the backbone's full weights (rank 0), so predict can run at any world size
    head/rank00003.pt    one per rank: its head shard, head optimizer, gradient-exchange residuals,
                         scheduler, RNG states and data position
    meta.json            written last; step, world size, model-parallel size, label count
Everything is written under `.tmp-step...` and renamed by rank 0 once every rank has finished, so a
crash or Ctrl-C mid-write leaves the previous checkpoint intact and the torn one invisible. The last
`keep` checkpoints are kept.

Resuming with another model-parallel size (same world size) reshards the head: the label-sharded
tensors of the old shards (and their Adam moments) are concatenated and cut to the new label range.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.models.build import sharded_state_keys
from pipeline.parallel.grid import ProcessGrid
from pipeline.parallel.label_range import LabelRange


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from here (missing, or another world size)."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under root (one with meta.json), or None."""
    done = sorted(p for p in root.glob("step*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _optimizer_by_name(head: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Optimizer state keyed by parameter name, so it survives resharding."""
    names = {id(p): n for n, p in head.named_parameters()}
    return {names[id(p)]: dict(s) for p, s in optimizer.state.items()}


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".partial")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _backbone_weights(engine) -> dict[str, torch.Tensor] | None:
    """Full backbone weights on rank 0 (a collective under ZeRO-3, where parameters are partitioned)."""
    if engine.zero_optimization_stage() == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def save_checkpoint(
    root: Path,
    step: int,
    engine,
    head: nn.Module,
    head_optimizer: torch.optim.Optimizer,
    rank_state: dict[str, Any],
    meta: dict[str, Any],
    grid: ProcessGrid,
    keep: int,
) -> Path:
    """Write checkpoint `step` on every rank (collective); returns its final path."""
    final = root / f"step{step:08d}"
    tmp = root / f".tmp-step{step:08d}"
    if grid.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "head").mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(tmp / "backbone"), tag="backbone", save_latest=False)
    weights = _backbone_weights(engine)
    if grid.rank == 0:
        _atomic_save(weights, tmp / "backbone.pt")
    shard = {
        "head": head.state_dict(),
        "optimizer": _optimizer_by_name(head, head_optimizer),
        "rng": rng_state(),
        **rank_state,
    }
    _atomic_save(shard, tmp / "head" / f"rank{grid.rank:05d}.pt")
    dist.barrier()
    if grid.rank == 0:
        meta = {**meta, "step": step, "world_size": grid.world_size, "model_parallel": grid.mp}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        done = sorted(p for p in root.glob("step*") if (p / "meta.json").is_file())
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json)")
    return json.loads(meta_file.read_text())


def load_head_shards(path: Path, old_mp: int) -> list[dict[str, Any]]:
    """The head shards of model-parallel group 0 of the writer (ranks 0 .. old_mp-1), in label order."""
    return [
        torch.load(path / "head" / f"rank{r:05d}.pt", map_location="cpu", weights_only=False)
        for r in range(old_mp)
    ]


def reshard_head_state(
    shards: list[dict[str, Any]], head: nn.Module, label_range: LabelRange
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """Head state_dict and by-name optimizer state for `label_range`, cut from another split's shards."""
    sharded = sharded_state_keys(head, label_range.size)
    cut = slice(label_range.start, label_range.stop)
    state = {}
    for key, value in shards[0]["head"].items():
        state[key] = torch.cat([s["head"][key] for s in shards])[cut] if key in sharded else value
    optimizer: dict[str, dict[str, Any]] = {}
    for name, entry in shards[0]["optimizer"].items():
        optimizer[name] = {
            k: torch.cat([s["optimizer"][name][k] for s in shards])[cut]
            if name in sharded and torch.is_tensor(v) and v.dim()
            else v
            for k, v in entry.items()
        }
    return state, optimizer


def restore_head(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, torch.Tensor],
    by_name: dict[str, dict[str, Any]],
) -> None:
    head.load_state_dict(state)
    params = dict(head.named_parameters())
    for name, entry in by_name.items():
        p = params[name]
        optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in entry.items()}
