"""Inference bundles (`launch/export.py`, `pipeline.train.bundle`) from real 2-rank training runs.

Two runs train at the same time under `deepspeed` (2 CPU ranks each, `parallel.model_parallel=2`, so
every head is split by label range): a dense head and an FFI head (replicated intermediate layer,
sharded sparse layer). Each is exported; the bundle's head must be the concatenation of the shards,
and `launch/predict.py` on the bundle (one process, and 2 launched ranks) must give the top-k of
`predict.py` on the run and the trainer's own test metrics, as must the documented snippet of
`pipeline/train/bundle.py`, run as it is written. The independent processes of each stage run
concurrently to keep the module within about 90 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from launch import export
from pipeline.data import make_loader
from pipeline.train import bundle
from pipeline.train.checkpoint import latest_checkpoint
from tests.launchers import LAUNCH_ENV, ROOT, launch_command

TRAIN = ROOT / "launch" / "train.py"
PREDICT = ROOT / "launch" / "predict.py"
EXPORT = ROOT / "launch" / "export.py"
ENV = {**os.environ, **LAUNCH_ENV}
BASE = [
    "data.batch_size=32",
    "data.num_workers=1",
    "data.shuffle_buffer=100",
    "model.embed_dim=16",
    "model.hidden_dims=[32]",
    "model.loss=softmax",
    "parallel.model_parallel=2",
    f"deepspeed={ROOT / 'configs' / 'deepspeed' / 'zero1.json'}",
    "train.steps=4",
    "train.lr=0.03",
    "train.warmup_steps=0",
    "train.eval_every=0",
    "train.checkpoint_every=0",
]
NEIGHBOURS_K = 4
HEADS = {
    "dense": ["model.head=dense"],
    "ffi": [
        "model.head=ffi",
        "model.ffi.hidden=64",
        "model.ffi.fan_in=8",
        "model.ffi.rewire_every=2",
        f"model.neighbours.k={NEIGHBOURS_K}",  # its scores add the training samples' votes
        "model.neighbours.weight=3",  # large enough to change the top-k
    ],
}
NUM_FEATURES = 300
SHARDED = {"dense": {"weight", "bias"}, "ffi": {"sparse.values", "sparse.indices", "sparse.bias"}}


def run_together(
    jobs: list[tuple[list[str], Path]], timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Run every (command, working folder) at once; output goes to files (no pipe can fill up)."""
    started = []
    for i, (cmd, cwd) in enumerate(jobs):
        cwd.mkdir(parents=True, exist_ok=True)
        out, err = open(cwd / f"job{i}.out", "w+"), open(cwd / f"job{i}.err", "w+")
        started.append((subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=out, stderr=err, text=True), out, err))
    done = []
    for proc, out, err in started:
        proc.wait(timeout=timeout)
        with out, err:
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out.read(), err.read()))
    return done


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def predict_cmd(checkpoint: Path, out: Path, ranks: int = 1) -> list[str]:
    launcher = [sys.executable] if ranks == 1 else launch_command("deepspeed", ranks)
    return [*launcher, str(PREDICT), "--checkpoint", str(checkpoint), "--out", str(out)]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_topk(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    assert [r["labels"] for r in got] == [r["labels"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert np.allclose(a["scores"], b["scores"], rtol=0, atol=1e-6), (a, b)


def snippet() -> str:
    """The 5 indented lines under the first line of bundle.py's docstring, as they are written."""
    lines = bundle.__doc__.splitlines()[2:7]
    assert all(line.startswith("    ") for line in lines) and "predict_topk(" in lines[-1], lines
    return "\n".join(line[4:] for line in lines)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """Data, the two runs, their bundles, and every prediction of them (run concurrently per stage)."""
    root = tmp_path_factory.mktemp("export")
    cmd = [sys.executable, str(ROOT / "launch" / "prepare_data.py"), "synthetic", "--out", str(root / "data")]
    cmd += ["--num-train", "600", "--num-test", "200", "--num-features", str(NUM_FEATURES)]
    cmd += ["--num-labels", "50"]
    subprocess.run([*cmd, "--seed", "3", "--shard-size", "200"], check=True, capture_output=True)

    jobs = []
    for head, sets in HEADS.items():
        args = ["--config", str(ROOT / "configs" / "demo.json")]
        paths = [f"data.train={root / 'data' / 'train'}", f"data.test={root / 'data' / 'test'}"]
        for s in [*BASE, *sets, *paths, f"train.output_dir={root / head / 'run'}"]:
            args += ["--set", s]
        jobs.append(([*launch_command("deepspeed", 2), str(TRAIN), *args], root / head))
    for proc in run_together(jobs):
        ok(proc)

    for head in HEADS:
        assert (
            export.main(["--checkpoint", str(root / head / "run"), "--out", str(root / head / "model")]) == 0
        )

    test_x = features(root / "data" / "test")
    sp.save_npz(root / "dense" / "features.npz", test_x)
    jobs = []
    for head in HEADS:
        d = root / head
        jobs.append((predict_cmd(d / "run", d / "p_run.jsonl"), d / "run_1"))
        jobs.append((predict_cmd(d / "model", d / "p_bundle.jsonl"), d / "bundle_1"))
    d = root / "ffi"
    jobs.append(([*predict_cmd(d / "run", d / "p_head.jsonl"), "--neighbours", "0"], d / "head_1"))
    ensemble = [
        *predict_cmd(root / "dense" / "run", d / "p_ensemble.jsonl", ranks=2),
        "--checkpoint",
        str(d / "run"),
    ]
    jobs.append((ensemble, d / "ensemble_2"))
    d = root / "dense"
    jobs.append((predict_cmd(d / "model", d / "p_bundle2.jsonl", ranks=2), d / "bundle_2"))
    save = "\nimport numpy as np\nnp.save('ids.npy', ids)\nnp.save('scores.npy', scores)\n"
    jobs.append(([sys.executable, "-c", snippet() + save], d))
    for proc in run_together(jobs):
        ok(proc)
    return {"root": root}


def features(test: Path) -> sp.csr_matrix:
    """The test set's features as CSR [N, num_features], rows in sample-id order."""
    rows_by_id = {}
    for batch in make_loader(test, 64, 0, 1, shuffle=False):
        offsets = [*batch.feature_offsets.tolist(), batch.feature_indices.numel()]
        for i in np.flatnonzero(batch.valid.numpy()):
            a, b = offsets[i], offsets[i + 1]
            rows_by_id[int(batch.sample_ids[i])] = (batch.feature_indices[a:b], batch.feature_weights[a:b])
    n = len(rows_by_id)
    assert sorted(rows_by_id) == list(range(n))
    ids = [rows_by_id[i] for i in range(n)]
    indptr = np.cumsum([0, *(len(f) for f, _ in ids)])
    indices = np.concatenate([f.numpy() for f, _ in ids])
    data = np.concatenate([w.numpy() for _, w in ids])
    return sp.csr_matrix((data, indices, indptr), shape=(n, NUM_FEATURES))


@pytest.mark.parametrize("head", list(HEADS))
def test_the_bundle_holds_the_merged_head_and_the_backbone(work, head):
    root = work["root"] / head
    checkpoint, model = latest_checkpoint(root / "run" / "checkpoints"), root / "model"
    doc = bundle.verify_bundle(model)
    assert (doc["step"], doc["num_labels"], doc["head"], doc["backbone"]) == (4, 50, head, "bow")
    assert doc["source"] == str(checkpoint.resolve())
    assert {"backbone.pt", "head.pt", "config.json", "train/manifest.json"} <= set(doc["files"])
    assert ("neighbours.pt" in doc["files"]) == (head == "ffi")
    assert not any(p.name.startswith(".") for p in model.parent.iterdir())  # no temporary folder left
    merged = torch.load(model / "head.pt", weights_only=True)
    shards = [torch.load(checkpoint / "head" / f"rank{r:05d}.pt", weights_only=False)["head"] for r in (0, 1)]
    assert set(merged) == set(shards[0])
    for key, value in merged.items():
        if key in SHARDED[head]:
            assert shards[0][key].shape[0] == shards[1][key].shape[0] == 25
            assert torch.equal(value, torch.cat([shards[0][key], shards[1][key]])), key
        else:
            assert torch.equal(value, shards[0][key]) and torch.equal(value, shards[1][key]), key
    backbone = torch.load(checkpoint / "backbone.pt", weights_only=True)
    copied = torch.load(model / "backbone.pt", weights_only=True)
    assert "bag.weight" in copied and all(torch.equal(copied[k], v) for k, v in backbone.items())
    assert (model / "backbone.pt").read_bytes() == (checkpoint / "backbone.pt").read_bytes()
    whole = bundle.load_bundle(model)
    assert (whole.label_range.start, whole.label_range.stop) == (0, 50)
    assert whole.manifest.num_features == NUM_FEATURES and whole.manifest.label_frequencies.shape == (50,)


@pytest.mark.parametrize("head", list(HEADS))
def test_predict_on_the_bundle_equals_predict_on_the_run_and_the_trainer(work, head):
    root = work["root"] / head
    want = rows(root / "p_run.jsonl")
    assert len(want) == 200 and all(len(r["labels"]) == 5 for r in want)
    outputs = ["p_bundle.jsonl", *(["p_bundle2.jsonl"] if head == "dense" else [])]
    trainer = json.loads((root / "run" / "final_metrics.json").read_text())["final"]
    for name in outputs:
        assert_same_topk(rows(root / name), want)
        printed = json.loads((root / f"{name}.metrics.json").read_text())
        assert printed.keys() == trainer.keys()
        for key, value in trainer.items():
            assert printed[key] == pytest.approx(value, abs=1e-6), (name, key)


def test_the_documented_snippet_gives_the_same_topk(work):
    root = work["root"] / "dense"
    want = rows(root / "p_run.jsonl")
    ids, scores = np.load(root / "ids.npy"), np.load(root / "scores.npy")
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (200, 5)
    assert ids.tolist() == [r["labels"] for r in want]
    assert np.allclose(scores, [r["scores"] for r in want], rtol=0, atol=1e-6)


def export_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPORT), *args], capture_output=True, text=True, env=ENV)


def test_export_errors_name_the_path_and_exit_2(work, tmp_path, capsys):
    root = work["root"] / "dense"
    missing = tmp_path / "no_run"
    proc = export_cli("--checkpoint", str(missing), "--out", str(tmp_path / "m"))
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.startswith("export: ") and str(missing) in proc.stderr and "Traceback" not in proc.stderr
    )
    assert not (tmp_path / "m").exists()

    taken = root / "model"
    before = (taken / "bundle.json").read_bytes()
    assert export.main(["--checkpoint", str(root / "run"), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: ") and str(taken) in err and "--force" in err
    assert (taken / "bundle.json").read_bytes() == before
    forced = tmp_path / "forced"
    shutil.copytree(taken, forced)
    (forced / "stale.txt").write_text("from before\n")
    assert export.main(["--checkpoint", str(root / "run"), "--out", str(forced), "--force"]) == 0
    assert not (forced / "stale.txt").exists() and bundle.verify_bundle(forced)["step"] == 4

    damaged = tmp_path / "damaged"
    shutil.copytree(root / "run", damaged, ignore=shutil.ignore_patterns("tensorboard"))
    backbone = latest_checkpoint(damaged / "checkpoints") / "backbone.pt"
    backbone.write_bytes(backbone.read_bytes()[: backbone.stat().st_size // 2])
    out = tmp_path / "out" / "model"
    assert export.main(["--checkpoint", str(damaged), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("export: ") and str(backbone) in err, err
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())  # no temporary folder either


def test_neighbour_votes_and_an_ensemble_equal_a_plain_reference(work):
    """The FFI run's predictions (trainer, predict.py, bundle: equal above) are the head's logits plus
    weight x the votes of the k nearest training samples, computed here from the definition in one
    process from the bundle's weights; without them (`--neighbours 0`) the top-k is the head's own.
    The ensemble of the dense run and the FFI run (predict.py on 2 ranks, labels split between them)
    scores the sum of the dense head's logits and the FFI run's scores."""
    root = work["root"] / "ffi"
    model = bundle.load_bundle(root / "model")
    dense = bundle.load_bundle(work["root"] / "dense" / "model")
    settings = model.config.model.neighbours
    assert (settings.k, settings.weight) == (NEIGHBOURS_K, 3.0) and model.neighbours is not None
    assert dense.neighbours is None

    def embed_all(split: str, model=model) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[int]]]:
        ids, embeddings, labels = [], [], []
        with torch.no_grad():
            for batch in make_loader(work["root"] / "data" / split, 64, 0, 1, shuffle=False):
                h = model.backbone(batch.feature_indices, batch.feature_offsets, batch.feature_weights)
                for i in np.flatnonzero(batch.valid.numpy()):
                    ids.append(int(batch.sample_ids[i]))
                    embeddings.append(h[i].double())
                    labels.append(
                        batch.label_indices[batch.label_indptr[i] : batch.label_indptr[i + 1]].tolist()
                    )
        return ids, embeddings, labels

    _, train_h, train_labels = embed_all("train")
    keys = torch.nn.functional.normalize(torch.stack(train_h), dim=1)
    test_ids, test_h, _ = embed_all("test")
    dense_ids, dense_h, _ = embed_all("test", dense)
    assert dense_ids == test_ids
    with torch.no_grad():
        logits = model.head(torch.stack(test_h).float()).double()
        dense_logits = dense.head(torch.stack(dense_h).float()).double()
    changed = 0
    want_rows = {r["id"]: r for r in rows(root / "p_run.jsonl")}
    head_rows = {r["id"]: r for r in rows(root / "p_head.jsonl")}
    ensemble_rows = {r["id"]: r for r in rows(root / "p_ensemble.jsonl")}
    assert len(ensemble_rows) == len(test_ids)
    for sid, h, z, z_dense in zip(test_ids, test_h, logits, dense_logits, strict=True):
        cos = keys @ (h / h.norm())
        best = cos.argsort(descending=True)[:NEIGHBOURS_K]
        w = cos[best].clamp(min=0) ** settings.power
        w = w / w.sum()
        votes = torch.zeros_like(z)
        for j, wj in zip(best.tolist(), w.tolist(), strict=True):
            votes[train_labels[j]] += wj
        scores = z + settings.weight * votes
        got = want_rows[sid]
        assert np.allclose(got["scores"], scores.topk(5).values.numpy(), rtol=0, atol=1e-4), sid
        assert np.allclose(head_rows[sid]["scores"], z.topk(5).values.numpy(), rtol=0, atol=1e-4), sid
        changed += got["labels"] != head_rows[sid]["labels"]
        both = (scores + z_dense).topk(5).values.numpy()
        assert np.allclose(ensemble_rows[sid]["scores"], both, rtol=0, atol=1e-4), sid
    assert changed > 0  # the votes do move the top-k


def test_a_negative_neighbour_count_is_refused(work):
    proc = subprocess.run(
        [*predict_cmd(work["root"] / "ffi" / "run", work["root"] / "bad.jsonl"), "--neighbours", "-1"],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "predict: --neighbours -1: expected a k >= 0" in proc.stderr, proc.stderr[-2000:]
    assert not (work["root"] / "bad.jsonl").exists()
