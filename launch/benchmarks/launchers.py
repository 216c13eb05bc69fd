"""The same training job under each launcher: samples/s of deepspeed against mpirun and its settings.

Why: a 4-rank job on a 2-core host ran several times slower under mpirun than under deepspeed. The
suspect is OpenMPI's progress engine: under mpirun Horovod's controller is MPI, whose background
thread negotiates every few milliseconds and, like every blocking MPI call, busy-polls while it
waits; with more ranks than cores those polling threads take the cores the other ranks compute on.
Variants, one job each, launched as a user types them on this host (--ranks local ranks):

  deepspeed        `deepspeed --num_gpus N` (Horovod over Gloo, which sleeps while it waits)
  mpirun           `mpirun -np N` (Horovod's MPI controller)
  mpirun-yield     the same with `--mca mpi_yield_when_idle 1` (MPI waits yield the core)
  mpirun-gloo      the same with `-x HOROVOD_CONTROLLER=gloo` (Horovod over Gloo under mpirun)

What is timed: the trainer's own `samples_per_s` of each logged window (optimizer steps only, no
start-up, evaluation or checkpoints), median over the windows after the first. The variants run in
--rounds rounds (order rotating), and each variant's figure is the median over its rounds; ratios
are against deepspeed. Data: `--data DIR` (train/ and test/ shards) or a small synthetic set.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("deepspeed", "mpirun", "mpirun-yield", "mpirun-gloo")
LAUNCH_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMP_NUM_THREADS": "1",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="train/ and test/ shards (default: synthetic)")
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.json"), help="the job's config")
    parser.add_argument("--ranks", type=int, default=4, help="local ranks per job")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per job")
    parser.add_argument("--rounds", type=int, default=2, help="jobs per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")


def command(variant: str, ranks: int) -> list[str]:
    if variant == "deepspeed":
        return ["deepspeed", "--num_gpus", str(ranks)]
    mpirun = ["mpirun", "-np", str(ranks), "--bind-to", "none"]
    if variant == "mpirun-yield":
        mpirun += ["--mca", "mpi_yield_when_idle", "1"]
    if variant == "mpirun-gloo":
        mpirun += ["-x", "HOROVOD_CONTROLLER=gloo"]
    return [*mpirun, sys.executable]


def one_job(variant: str, args: argparse.Namespace, data: Path, out: Path) -> float:
    """Median samples/s of one job's logged windows after the first."""
    sets = [
        f"data.train={data / 'train'}",
        f"data.test={data / 'test'}",
        "data.num_workers=1",
        f"train.steps={args.steps}",
        "train.log_every=2",
        "train.eval_every=0",
        "train.checkpoint_every=0",
        f"train.output_dir={out}",
    ]
    cmd = [*command(variant, args.ranks), str(ROOT / "launch" / "train.py"), "--config", args.config]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **LAUNCH_ENV}, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"{variant} job failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in rows if r["kind"] == "train"][1:]
    return statistics.median(rates)


def run(args: argparse.Namespace) -> dict:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"bench launchers: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    rates: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="bench-launchers-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            from pipeline.data.convert import write_synthetic

            write_synthetic(
                data, num_train=8192, num_test=512, num_features=5000, num_labels=2000, progress=False
            )
        for r in range(args.rounds):
            for i in range(len(variants)):
                variant = variants[(i + r) % len(variants)]
                rate = one_job(variant, args, data, Path(tmp) / f"{variant}-{r}")
                rates[variant].append(rate)
                print(f"  round {r}: {variant:>13} {rate:8.0f} samples/s", flush=True)
    medians = {v: statistics.median(x) for v, x in rates.items()}
    base = medians.get("deepspeed")
    print(f"{args.ranks} ranks on {os.cpu_count()} cores, {args.steps} steps, config {args.config}")
    for v in variants:
        ratio = f"  ({medians[v] / base:.2f}x deepspeed)" if base else ""
        print(f"  {v:>13}: median {medians[v]:.0f} samples/s over {len(rates[v])} jobs{ratio}")
    return {"ranks": args.ranks, "cores": os.cpu_count(), "samples_per_s": medians, "per_job": rates}
