"""Training steps per second of the BoW recipe: the sparse bag-of-words table against the dense one,
or any two settings (`--before KEY=VALUE ...`: the recipe with those overrides against the recipe).

What is timed: `Trainer.train_step` itself (forward, DeepSpeed backward and step, the head's exchange
and Adam, and with `model.sparse_bag` the row exchange and lazy Adam of the table) on 2 real ranks
(gloo, 1 thread each, Horovod up as under the deepspeed launcher), built from `configs/xmc_bow.json`
(1024-wide bag, 512-d embeddings, dense head split over the 2 ranks, bce, dropout 0.2, batch 256 per
rank, ZeRO-1, no clipping) with `model.sparse_bag` true and false: two trainers in each rank's process,
fed the same pre-loaded batches (no data loading in the timed part). With `--before`, the variants are
`before` (the overrides) and `after` (the recipe as it is), e.g. `--before model.fused_loss=false`
for the fused squared hinge; `--set` changes both. Steps of the two variants are
interleaved (rounds of --steps-per-round each, the order alternating), so load from other processes
hits both alike; a step's time is the slowest rank's. Figures after --warmup steps of each: medians
per variant, and the median over rounds of the paired ratio (dense time / sparse time of the same
round: steps measured seconds apart share the machine's load, which on a loaded machine moves the
per-variant medians by tens of percent).

Data: `--data DIR` (a folder with train/ and test/ shards, e.g. the Debian set converted by
prepare_data.py), or by default the project's synthetic generator at the Debian set's shape (34,929
features, 19,983 labels; ~75 tf-idf non-zeros per row: Zipf background words plus label signatures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"dense": ["model.sparse_bag=false"], "sparse": ["model.sparse_bag=true"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=None, help="folder with train/ and test/ shards (default: synthetic)"
    )
    parser.add_argument("--features", type=int, default=34_929, help="synthetic: vocabulary size")
    parser.add_argument("--labels", type=int, default=19_983, help="synthetic: number of labels")
    parser.add_argument("--config", default=str(ROOT / "configs" / "xmc_bow.json"), help="the recipe")
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds")
    parser.add_argument("--steps-per-round", type=int, default=1, help="timed steps per variant and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument(
        "--before",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="time the recipe against these",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both variants")


def worker(spec: dict) -> None:
    """One rank: both trainers, the same batches, interleaved timed steps; rank 0 prints the times."""
    import torch
    import torch.distributed as dist

    from pipeline.config import load_config
    from pipeline.parallel.distributed import init_distributed
    from pipeline.parallel.grid import build_grid
    from pipeline.parallel.horovod import init_horovod, shutdown_horovod
    from pipeline.train.loop import Trainer

    torch.set_num_threads(1)
    launch = init_distributed()
    base = load_config(spec["config"])
    grid = build_grid(base.parallel.model_parallel)
    init_horovod(launch.launcher, grid.layout)
    trainers = {}
    variants = spec["variants"]
    for name, changes in variants.items():
        overrides = [
            f"data.train={spec['data']}/train",
            f"data.test={spec['data']}/test",
            "data.num_workers=0",
            f"train.output_dir={spec['out']}/{name}",
            "train.epochs=0",
            "train.steps=1000",
            *spec["set"],
            *changes,
        ]
        trainers[name] = Trainer(load_config(spec["config"], overrides), grid)
    needed = spec["warmup"] + spec["rounds"] * spec["steps_per_round"]
    first, second = variants
    source = trainers[first].train_batches()
    batches = list(itertools.islice(source, needed))
    source.close()
    unique = [torch.unique(b.feature_indices).numel() for b in batches]
    times: dict[str, list[float]] = {name: [] for name in variants}

    def timed(name: str, batch) -> float:
        dist.barrier()
        started = time.perf_counter()
        trainers[name].train_step(iter([batch]))
        elapsed = torch.tensor([time.perf_counter() - started])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return elapsed.item()

    for name in variants:
        for batch in batches[: spec["warmup"]]:
            timed(name, batch)
    timed_batches = iter(batches[spec["warmup"] :])
    for r in range(spec["rounds"]):
        chunk = list(itertools.islice(timed_batches, spec["steps_per_round"]))
        for name in (first, second) if r % 2 == 0 else (second, first):
            times[name] += [timed(name, batch) for batch in chunk]
    if grid.rank == 0:
        samples = trainers[first].samples_per_step
        print(json.dumps({"times": times, "samples_per_step": samples, "unique_ids": unique}), flush=True)
    for trainer in trainers.values():
        trainer.logbook.close()
    shutdown_horovod()


def variants(args: argparse.Namespace) -> dict[str, list[str]]:
    """Name -> config overrides of the two timed variants, the slower-expected first."""
    return TABLES if args.before is None else {"before": args.before, "after": []}


def time_variants(args: argparse.Namespace, data: Path, out: Path) -> dict:
    from pipeline.config import ConfigError, load_config

    for name, changes in variants(args).items():  # a bad key stops here, named, before any rank starts
        try:
            load_config(args.config, [*args.set, *changes])
        except ConfigError as e:
            raise SystemExit(f"bench bag: variant {name}: {e}") from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = {
        "config": args.config,
        "data": str(data),
        "out": str(out),
        "rounds": args.rounds,
        "steps_per_round": args.steps_per_round,
        "warmup": args.warmup,
        "variants": variants(args),
        "set": args.set,
    }
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
        env.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", json.dumps(spec)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        )
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"timing workers failed: {[p.returncode for p in procs]}")
    return json.loads(outputs[0].strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-bag-") as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            from pipeline.data.convert import write_synthetic

            per_rank = 256 * (args.warmup + args.rounds * args.steps_per_round)
            write_synthetic(
                data,
                num_train=2 * per_rank,
                num_test=512,
                num_features=args.features,
                num_labels=args.labels,
                shard_size=per_rank,
                progress=False,
            )
        result = time_variants(args, data, Path(tmp) / "runs")
    samples = result["samples_per_step"]
    names = list(variants(args))
    medians = {name: statistics.median(t) for name, t in result["times"].items()}
    rate = {name: samples / m for name, m in medians.items()}
    ratio = rate[names[1]] / rate[names[0]]
    paired = statistics.median(a / b for a, b in zip(*(result["times"][n] for n in names), strict=True))
    unique = statistics.mean(result["unique_ids"])
    print(f"BoW recipe ({args.config} {' '.join(args.set)}), 2 ranks x 1 thread, {samples} samples per step")
    print(f"  data: {data}; distinct feature ids per rank batch: {unique:.0f} (mean)")
    for name in names:
        n = len(result["times"][name])
        ms = medians[name] * 1e3
        what = " ".join(variants(args)[name]) or "the recipe"
        print(f"  {name:>6} ({what}): median {ms:.0f} ms/step over {n} steps, {rate[name]:.0f} samples/s")
    print(
        f"  {names[1]} / {names[0]}: {ratio:.2f}x samples/s (ratio of medians), "
        f"{paired:.2f}x (median paired ratio)"
    )
    return {
        "variants": variants(args),
        "samples_per_step": samples,
        "step_median_s": medians,
        "samples_per_s": rate,
        "speedup": ratio,
        "speedup_paired": paired,
        "unique_ids_per_rank_batch": unique,
        "step_times_s": result["times"],
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(f"run through the dispatcher: python {ROOT / 'launch' / 'bench.py'} bag")
