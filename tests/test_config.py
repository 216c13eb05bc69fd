"""Config validation: every error is one line naming the key path, exit code 2, before any start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, RunConfig, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, obj: object, name: str = "run.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "raw, overrides, message",
    [
        ({"model": {"hed": "dense"}}, [], "model.hed: unknown key"),
        ({"trian": {}}, [], "trian: unknown key"),
        ({"data": {"batch_size": "big"}}, [], "data.batch_size: Input should be a valid integer"),
        (
            {"parallel": {"model_parallel": 0}},
            [],
            "parallel.model_parallel: Input should be greater than or equal to 1",
        ),
        (
            {"model": {"head": "sparse"}},
            [],
            "model.head: expected one of 'dense', 'ffi' or 'rp', got 'sparse'",
        ),
        (
            {"model": {"ffi": {"hidden": 16, "fan_in": 32}}},
            [],
            "model.ffi: fan_in=32 must not exceed hidden=16",
        ),
        ({}, ["model.loss=hinge"], "model.loss: expected one of 'auto', 'softmax', 'bce' or 'squared_hinge'"),
        ({}, ["train.stepz=3"], "train.stepz: unknown key"),
        ({}, ["train.lr=-1"], "train.lr: Input should be greater than 0"),
        ({}, ["nonsense"], "--set 'nonsense': expected KEY.PATH=VALUE"),
        ({"deepspeed": "missing_ds.json"}, [], "deepspeed: file not found"),
        ({"deepspeed": {"fp16": {"enabled": True}}}, [], "deepspeed.fp16.enabled: not supported"),
    ],
)
def test_invalid_config_names_the_key(tmp_path, raw, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, raw), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="--config: file not found"):
        load_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)


def test_overrides_and_deepspeed_path_resolve(tmp_path):
    (tmp_path / "ds").mkdir()
    write(tmp_path / "ds", {"zero_optimization": {"stage": 2}}, "z2.json")
    cfg = load_config(
        write(tmp_path, {"deepspeed": "ds/z2.json", "model": {"head": "ffi"}}),
        [
            "parallel.model_parallel=2",
            "train.output_dir=out/x",
            "model.hidden_dims=[64, 32]",
            "model.ffi.fan_in=8",
        ],
    )
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}}
    assert (cfg.parallel.model_parallel, cfg.train.output_dir) == (2, "out/x")
    assert cfg.model.hidden_dims == [64, 32] and cfg.model.ffi.fan_in == 8 and cfg.model.head == "ffi"


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, {"model": {"head": "rp", "rp": {"dim": 16}}}), ["train.steps=7"])
    save_config(cfg, tmp_path / "out" / "config.json")
    again = RunConfig.model_validate_json((tmp_path / "out" / "config.json").read_text())
    assert again == cfg


@pytest.mark.parametrize(
    "head, loss, want",
    [
        ("dense", "auto", "squared_hinge"),
        ("rp", "auto", "squared_hinge"),
        ("ffi", "auto", "bce"),
        ("ffi", "squared_hinge", "squared_hinge"),
        ("dense", "softmax", "softmax"),
    ],
)
def test_auto_loss_is_the_heads_preferred_one(tmp_path, head, loss, want):
    from pipeline.models.build import loss_kind

    cfg = load_config(write(tmp_path, {}), [f"model.head={head}", f"model.loss={loss}"])
    assert loss_kind(cfg.model) == want


def test_shipped_configs_are_valid():
    configs = sorted((ROOT / "configs").glob("*.json"))
    assert configs, "no run configs shipped"
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "raw, extra, message",
    [
        ({"model": {"hed": 1}}, [], "config error: model.hed: unknown key"),
        ({}, ["--set", "parallel.model_parallel=abc"], "config error: parallel.model_parallel:"),
        ({"deepspeed": "nowhere.json"}, [], "config error: deepspeed: file not found"),
        (
            {"data": {"train": "d/a", "test": "d/b"}},
            [],
            "config error: data.synthetic: generating needs data.train and data.test",
        ),
    ],
)
def test_train_cli_exits_2_before_startup(tmp_path, raw, extra, message):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(write(tmp_path, raw)), *extra],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


@pytest.mark.parametrize(
    "sets, message",
    [
        (["parallel.model_parallel=3"], "parallel.model_parallel=3 must be >= 1 and divide the world size 4"),
        (["data.streams=6"], "config error: data.streams: 6 data streams cannot be shared by 4 ranks"),
        (
            ["data.streams=8", "data.batch_size=1"],
            "data.streams: a global batch of 1 x 4 samples cannot take one from each of 8 data streams",
        ),
        (
            ["model.loss_chunk=64", "model.head_update=chunk", "parallel.model_parallel=2"],
            "model.head_update: 'chunk' updates the head inside the backward, which needs its whole "
            "gradient there: no data-parallel head replicas (here 2",
        ),
        (["model.head_update=chunk"], "model: head_update='chunk' needs loss_chunk > 0"),
    ],
)
def test_the_grid_and_the_data_streams_must_fit_the_world(tmp_path, sets, message):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            "--config",
            str(write(tmp_path, {})),
            *(arg for s in sets for arg in ("--set", s)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "WORLD_SIZE": "4"},
    )
    assert proc.returncode == 2
    assert message in proc.stderr
