"""Quality side by side: the libraries users already have, and this pipeline's heads, on one split.

    python launch/bench.py quality --data FOLDER [--systems omikuji,pecos,napkinxc,dense,ffi,rp]
                                   [--config configs/xmc_bow.json] [--set key=value ...] [--ranks 2]
                                   [--ensemble N]

FOLDER holds `train.txt` and `test.txt` in the Extreme Classification Repository's BoW format (e.g.
what `launch/make_debian_xmc.py` writes). Peers (`launch/benchmarks/peers.py`: Omikuji, PECOS
XR-Linear, napkinXC) train on the text files with their defaults and all threads; our heads train
under the DeepSpeed launcher on `--ranks` CPU ranks from shards converted once into `OUT/shards`,
with `--config` plus `model.head=<head>`, then `launch/predict.py` writes their top-k; `rp` also
runs `launch/recover.py` and scores the recovered dense head as `rp+recovered`. A run whose config
adds neighbour votes (`model.neighbours.k > 0`) is also scored by its head alone (`<head> head
alone`, same training); `--ensemble N` trains the dense head N - 1 more times (`train.seed` 1, 2, ...)
and scores the N runs as one ensemble (`dense xN`; train s and samples are the sums). Every system is
scored by the same code (`pipeline.train.metrics.XMCMetrics`, propensities A, B as given) from its
top-k on the whole test set, next to the popularity baseline.

Times: `train s` is the wall time a user waits for training (our jobs: launcher start-up, training,
their own final evaluation; peers: the library's fit call), `predict s` the wall time of predicting
the test set; `samples/s` = training samples x passes / train s. For our heads, `to best peer P@1`
is the training time (steps only, from the run's periodic evaluations) at which the head first
reached the best peer's P@1, when it did. Writes `OUT/quality.json` and a bar chart `OUT/quality.png`.

Text encoders (`text-dense`, `text-ffi`): the same rows as raw text, FOLDER's `trn.jsonl` and
`tst.jsonl` (make_debian_xmc.py writes both forms), converted once into `OUT/text_shards` and
trained with `--text-config` (default configs/text_minilm.json: the pretrained all-MiniLM-L6-v2
fine-tuned with the head) plus `--text-set` overrides. Their label ids (the text converter's
vocabulary) are mapped to the BoW ids by name through FOLDER's `labels.txt`, so every system is scored
against the same test labels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from launch.benchmarks.peers import PEERS, XMCMatrix, read_xmc_csr
from pipeline.data import convert_text, convert_xmc, read_label_names, read_manifest
from pipeline.train.logbook import read_records
from pipeline.train.metrics import XMCMetrics, popularity_baseline

ROOT = Path(__file__).resolve().parents[2]
OURS = ("dense", "ffi", "rp")
TEXT = ("text-dense", "text-ffi")
COLUMNS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="folder with train.txt and test.txt (XMC BoW format)")
    parser.add_argument("--out", default="runs/quality", help="shards, runs, table and chart go here")
    parser.add_argument("--systems", default=",".join((*PEERS, *OURS)), help="comma-separated")
    parser.add_argument("--config", default=str(ROOT / "configs" / "xmc_bow.json"), help="our run config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override our config")
    parser.add_argument(
        "--text-config", default=str(ROOT / "configs" / "text_minilm.json"), help="config of text-*"
    )
    parser.add_argument("--text-set", action="append", default=[], metavar="KEY=VALUE", help="for text-*")
    parser.add_argument("--ranks", type=int, default=2, help="CPU ranks of our training jobs")
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        metavar="N",
        help="also score the dense head as an ensemble of N runs (train.seed 0..N-1): row 'dense xN'",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the peers")
    parser.add_argument("--propensity-a", type=float, default=0.55)
    parser.add_argument("--propensity-b", type=float, default=1.5)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per training job")


@contextlib.contextmanager
def quiet_native_output():
    """Silence native libraries' logs and progress bars (Omikuji logs to stdout and redraws a bar per
    sample on stderr) at the descriptor level, where Python's redirection does not reach."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


class Scorer:
    """Our metrics of a [n_test, >= 5] top-k array against the test labels."""

    def __init__(self, train: XMCMatrix, test: XMCMatrix, a: float, b: float) -> None:
        self.frequencies = torch.from_numpy(np.asarray(train.Y.sum(0)).ravel().astype(np.int64))
        self.num_train, self.num_labels = train.Y.shape
        self.indptr = torch.from_numpy(test.Y.indptr.astype(np.int64))
        self.indices = torch.from_numpy(test.Y.indices.astype(np.int64))
        self.a, self.b = a, b

    def metrics(self) -> XMCMetrics:
        return XMCMetrics(self.num_labels, self.frequencies, self.num_train, A=self.a, B=self.b)

    def __call__(self, top_k: np.ndarray) -> dict[str, float]:
        m = self.metrics()
        m.update(torch.as_tensor(top_k, dtype=torch.int64), self.indptr, self.indices)
        return m.compute()

    def popularity(self) -> dict[str, float]:
        """The metrics of predicting the most frequent training labels for every test sample."""
        test = SimpleNamespace(label_indptr=self.indptr, label_indices=self.indices)
        return popularity_baseline(self.metrics(), [test])


def shards(data: Path, out: Path) -> dict[str, Path]:
    """Our shards of train.txt and test.txt, converted once (a complete conversion has a manifest)."""
    folders = {}
    for split in ("train", "test"):
        folder = out / "shards" / split
        if not (folder / "manifest.json").is_file():
            convert_xmc(data / f"{split}.txt", folder, progress=False)
        folders[split] = folder
    return folders


def text_shards(data: Path, out: Path) -> dict[str, Path]:
    """Our text shards of trn.jsonl and tst.jsonl, converted once."""
    folder = out / "text_shards"
    if not all((folder / split / "manifest.json").is_file() for split in ("train", "test")):
        convert_text(data / "trn.jsonl", folder, test_input=data / "tst.jsonl", progress=False)
    return {split: folder / split for split in ("train", "test")}


def bow_ids_of_text_labels(data: Path, text_train: Path) -> np.ndarray:
    """For each label id of the text shards, the id of the same label name in FOLDER/labels.txt."""
    bow = {name: i for i, name in enumerate((data / "labels.txt").read_text().splitlines())}
    names = read_label_names(text_train)
    missing = [n for n in names if n not in bow] if names is not None else ["(no label names)"]
    if missing:
        raise SystemExit(f"quality: text labels not in {data / 'labels.txt'}: {missing[:5]}")
    return np.array([bow[n] for n in names], dtype=np.int64)


def free_port() -> int:
    """A TCP port nothing listens on now (the launcher's default 29500 may be another job's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, args: list[str], ranks: int, log: Path, timeout: int) -> float:
    """Run a launch/ script under the DeepSpeed launcher on `ranks` CPU ranks; returns its wall time."""
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port())]
    cmd += [str(ROOT / "launch" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // ranks))}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{script} {' '.join(args)} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - t0


def _predict(
    run: Path, timeout: int, neighbours: int | None = None, others: tuple[Path, ...] = ()
) -> tuple[np.ndarray, float]:
    """Top-5 of the run's test set, one process (the head is merged from its shards); `neighbours`
    overrides the run's model.neighbours.k (0: the head alone); `others`: ensemble members."""
    name = "test_top5" if neighbours is None else f"test_top5_neighbours{neighbours}"
    out = run / f"{name}{f'_ensemble{1 + len(others)}' if others else ''}.npy"
    t0 = time.perf_counter()
    cmd = [sys.executable, str(ROOT / "launch" / "predict.py"), "--checkpoint", str(run), "--out", str(out)]
    cmd += [] if neighbours is None else ["--neighbours", str(neighbours)]
    for other in others:
        cmd += ["--checkpoint", str(other)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"predict on {run} failed: {proc.stderr[-3000:]}")
    return np.load(out), time.perf_counter() - t0


def _time_to(run: Path, p_at_1: float) -> float | None:
    """Training seconds at the first evaluation of `run` with P@1 >= p_at_1 (None: never reached)."""
    for r in read_records(run / "metrics.jsonl"):
        if r["kind"] == "eval" and r.get("P@1", 0.0) >= p_at_1 and "train_s" in r:
            return r["train_s"]
    return None


def train_ours(
    name: str,
    folders: dict[str, Path],
    args: argparse.Namespace,
    out: Path,
    config: str,
    extra: list[str],
    run_name: str | None = None,
) -> dict:
    """Train system `name` (a head, or text-<head>) with `config` + `extra` into runs/`run_name`
    (default: `name`), predict its test top-5."""
    head = name.removeprefix("text-")
    run = out / "runs" / (run_name or name)
    sets = [f"model.head={head}", f"data.train={folders['train']}", f"data.test={folders['test']}"]
    sets += [f"train.output_dir={run}", *extra]
    train_args = ["--config", config]
    for s in sets:
        train_args += ["--set", s]
    run.mkdir(parents=True, exist_ok=True)
    train_s = _launch("train.py", train_args, args.ranks, out / "runs" / f"{run.name}.log", args.timeout)
    top, predict_s = _predict(run, args.timeout)
    records = read_records(run / "metrics.jsonl")
    steps = max(r["step"] for r in records)
    batch = json.loads((run / "config.json").read_text())["data"]["batch_size"]
    result = {"top_k": top, "train_s": train_s, "predict_s": predict_s, "samples": steps * batch * args.ranks}
    results = {name: result | {"run": run}}
    if json.loads((run / "config.json").read_text())["model"]["neighbours"]["k"] > 0:
        alone, predict_s = _predict(run, args.timeout, neighbours=0)  # what the votes add, same run
        results[f"{name} head alone"] = result | {"top_k": alone, "predict_s": predict_s}
    if name == "rp":
        rec_s = _launch(
            "recover.py", ["--run", str(run)], args.ranks, out / "runs" / "recover.log", args.timeout
        )
        top, predict_s = _predict(run / "recovered", args.timeout)
        results["rp+recovered"] = result | {"top_k": top, "train_s": train_s + rec_s, "predict_s": predict_s}
    return results


def run(args: argparse.Namespace) -> dict:
    data, out = Path(args.data), Path(args.out)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    known = (*PEERS, *OURS, *TEXT)
    unknown = [s for s in systems if s not in known]
    if unknown:
        raise SystemExit(f"quality: unknown systems {unknown}: expected some of {', '.join(known)}")
    train, test = read_xmc_csr(data / "train.txt"), read_xmc_csr(data / "test.txt")
    out.mkdir(parents=True, exist_ok=True)
    score = Scorer(train, test, args.propensity_a, args.propensity_b)
    n_train, n_test = train.X.shape[0], test.X.shape[0]
    print(f"data: {n_train} train, {n_test} test, {train.X.shape[1]} features, {train.Y.shape[1]} labels")
    print(f"propensities: Jain et al. 2016, A = {args.propensity_a}, B = {args.propensity_b}", flush=True)

    rows: dict[str, dict] = {"popularity": {**score.popularity(), "train_s": 0.0}}
    for name in [s for s in systems if s in PEERS]:
        with quiet_native_output():
            r = PEERS[name](str(data / "train.txt"), train, test, 5, args.threads)
        rows[name] = {**score(r.top_k), "train_s": r.train_s, "predict_s": r.predict_s}
        rows[name]["samples_per_s"] = n_train / r.train_s
        print(f"{name}: P@1 {100 * rows[name]['P@1']:.2f} in {r.train_s:.1f} s", flush=True)

    ours = [s for s in systems if s in OURS]
    folders = shards(data, out) if ours else {}
    if ours and read_manifest(folders["train"]).num_samples != n_train:
        raise SystemExit(
            f"quality: {folders['train']} does not hold {data / 'train.txt'}; remove {out / 'shards'}"
        )
    best_peer = max((rows[p]["P@1"] for p in rows if p in PEERS), default=None)
    jobs = [(head, folders, args.config, args.set, None) for head in ours]
    texts = [s for s in systems if s in TEXT]
    if texts:
        text_folders = text_shards(data, out)
        to_bow = bow_ids_of_text_labels(data, text_folders["train"])
        jobs += [(name, text_folders, args.text_config, args.text_set, to_bow) for name in texts]
    for system, system_folders, config, extra, to_bow in jobs:
        for name, r in train_ours(system, system_folders, args, out, config, extra).items():
            top = r["top_k"] if to_bow is None else np.where(r["top_k"] >= 0, to_bow[r["top_k"]], -1)
            rows[name] = {**score(top), "train_s": r["train_s"], "predict_s": r["predict_s"]}
            rows[name]["samples_per_s"] = r["samples"] / r["train_s"]
            if best_peer is not None and name in (*OURS, *TEXT):  # periodic evaluations: head alone
                rows[name]["to_best_peer_p1_s"] = _time_to(r["run"], best_peer)
            print(f"{name}: P@1 {100 * rows[name]['P@1']:.2f} in {r['train_s']:.1f} s", flush=True)

    if args.ensemble > 1 and "dense" in rows:
        rows[f"dense x{args.ensemble}"] = train_ensemble(rows["dense"], folders, args, out, score)

    print_table(rows)
    plot(rows, out / "quality.png")
    result = {
        "data": str(data),
        "shape": {"train": n_train, "test": n_test, "features": train.X.shape[1], "labels": train.Y.shape[1]},
        "propensity": {"A": args.propensity_a, "B": args.propensity_b},
        "systems": rows,
    }
    (out / "quality.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def train_ensemble(
    first: dict, folders: dict[str, Path], args: argparse.Namespace, out: Path, score: Scorer
) -> dict:
    """The dense head as an ensemble: `args.ensemble - 1` more runs of it with train.seed 1, 2, ...,
    scored together with the first (runs/dense); train s and samples are the members' sums."""
    members, train_s, samples = [], first["train_s"], first["samples_per_s"] * first["train_s"]
    for seed in range(1, args.ensemble):
        extra = [*args.set, f"train.seed={seed}"]
        r = train_ours("dense", folders, args, out, args.config, extra, run_name=f"dense_seed{seed}")["dense"]
        members.append(r["run"])
        train_s, samples = train_s + r["train_s"], samples + r["samples"]
        print(
            f"dense seed {seed}: P@1 {100 * score(r['top_k'])['P@1']:.2f} in {r['train_s']:.1f} s", flush=True
        )
    top, predict_s = _predict(out / "runs" / "dense", args.timeout, others=tuple(members))
    return {**score(top), "train_s": train_s, "predict_s": predict_s, "samples_per_s": samples / train_s}


def print_table(rows: dict[str, dict]) -> None:
    head = f"{'system':>20} " + " ".join(f"{c:>7}" for c in COLUMNS)
    print(head + f" {'train s':>8} {'predict s':>9} {'samples/s':>9} {'to best P@1':>11}")
    for name, r in rows.items():
        cells = " ".join(f"{100 * r[c]:7.2f}" for c in COLUMNS)
        to = r.get("to_best_peer_p1_s", "")
        to = "never" if to is None else (f"{to:.0f}" if to != "" else "")
        sps = f"{r['samples_per_s']:9.0f}" if "samples_per_s" in r else " " * 9
        pred = f"{r['predict_s']:9.1f}" if "predict_s" in r else " " * 9
        print(f"{name:>20} {cells} {r['train_s']:8.1f} {pred} {sps} {to:>11}")


def plot(rows: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    width = 0.8 / len(COLUMNS)
    for i, column in enumerate(COLUMNS):
        xs = [j + (i - len(COLUMNS) / 2 + 0.5) * width for j in range(len(names))]
        ax.bar(xs, [100 * rows[n][column] for n in names], width, label=column)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("%")
    ax.set_ylim(0, 115)  # room for the legend above the bars
    ax.legend(ncol=len(COLUMNS), fontsize=8, loc="upper center")
    ax.set_title("quality on the test set (our metric code for every system)")
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(png)
