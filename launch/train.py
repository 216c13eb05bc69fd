"""Train an extreme classifier.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.json         # one node
    deepspeed --hostfile launch/hostfile.example launch/train.py --config ...  # several nodes
    mpirun -np 2 python launch/train.py --config configs/demo.json            # HPC nodes (MPI)

`--set key.path=value` overrides the config. The config is validated before any process starts
talking to another (exit code 2 on an invalid one). A rank that fails prints `[rank N] ...` and the
whole job exits non-zero.

`--resume auto` continues from the newest intact checkpoint in train.output_dir (its files checked
against the sizes and checksums of its meta.json; a damaged newer one is named and passed over; a
fresh start if there is none); `--resume PATH` from that checkpoint (a damaged file there is an error
naming it). `--check` starts every rank, runs the start-up self-check (exact allreduces over
torch.distributed and Horovod) and stops: a quick test of a cluster.

SIGTERM or SIGUSR1 to any rank (or to a launcher that passes it on): every rank finishes the current
step, the job writes a checkpoint of it and every rank exits with code 76 (`pipeline.train.preemption`).

Fault injection for the tests of the failure paths: the XMC_FAULT_* variables of
`pipeline/train/faults.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch.distributed

from pipeline.config import ConfigError, RunConfig, load_config, save_config
from pipeline.data.partition import streams_misfit
from pipeline.parallel.distributed import Peer, detect_launcher, env_rank, init_distributed
from pipeline.parallel.grid import GridError, Layout, build_grid
from pipeline.parallel.horovod import init_horovod, shutdown_horovod
from pipeline.parallel.peer_watch import PeerWatch, describe, name_peers_in
from pipeline.parallel.selfcheck import run_self_check
from pipeline.parallel.shared_files import check_same_files, check_shared_folder
from pipeline.train.faults import FaultInjector
from pipeline.train.preemption import PREEMPTED_EXIT, Preempted, StopSignals


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="run config (JSON)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--resume", default=None, metavar="auto|PATH", help="continue from a checkpoint")
    parser.add_argument("--check", action="store_true", help="start up, run the self-check, stop")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def check_before_start(config: RunConfig) -> None:
    """Fail before start-up when the model-parallel size, data.streams or a per-chunk head update
    (model.head_update) cannot fit the launched world,
    or when the synthetic set would have to be generated but data.train/data.test are not a
    <folder>/train, <folder>/test pair."""
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1")
    Layout(world, config.parallel.model_parallel)
    from pipeline.train.loop import check_head_update

    check_head_update(config, world)
    if config.data.streams and (misfit := streams_misfit(config.data.streams, world, config.data.batch_size)):
        raise ConfigError(f"data.streams: {misfit}")
    train, test = Path(config.data.train), Path(config.data.test)
    generate = config.data.synthetic is not None and not (train / "manifest.json").is_file()
    if generate and ((train.name, test.name) != ("train", "test") or train.parent != test.parent):
        raise ConfigError(
            f"data.synthetic: generating needs data.train and data.test to be <folder>/train and "
            f"<folder>/test, got {train} and {test}"
        )


def run(config: RunConfig, resume: str | None, check_only: bool) -> int:
    """The job on this rank; its exit code (0, or PREEMPTED_EXIT after a stop signal)."""
    stop = StopSignals(env_rank()).install()  # before start-up: a signal then stops at the first step
    launch = init_distributed()
    grid = build_grid(config.parallel.model_parallel)
    controller = init_horovod(launch.launcher, grid.layout)
    out = Path(config.train.output_dir)
    if grid.rank == 0:
        save_config(config, out / "config.json")
    faults = FaultInjector.from_env(grid.rank)
    faults.at_start()
    report = run_self_check(grid, launch.peers[grid.rank]) | {
        "launcher": launch.launcher,
        "horovod_controller": controller,
    }
    check_shared_folder(out, "train.output_dir", launch.peers)
    (out / "selfcheck").mkdir(parents=True, exist_ok=True)
    (out / "selfcheck" / f"rank{grid.rank}.json").write_text(json.dumps(report) + "\n")
    if grid.rank == 0:
        print(
            f"self-check ok: {grid.world_size} ranks ({grid.dp} dp x {grid.mp} mp) via {launch.launcher} "
            f"on {len(launch.hosts)} host(s) ({describe(launch.peers)}), horovod over {controller}",
            flush=True,
        )
    watch = PeerWatch(launch.peers, grid.rank, config.parallel.peer_timeout_s).start()
    code = 0
    try:
        if not check_only:
            train(config, grid, resume, faults, launch.peers, stop)
    except Preempted as e:
        if grid.rank == 0:
            print(f"preempted: {e}; continue with --resume auto", flush=True)
        code = PREEMPTED_EXIT
    watch.stop()
    shutdown_horovod()
    stop.restore()
    return code


def train(
    config: RunConfig,
    grid,
    resume: str | None,
    faults: FaultInjector,
    peers: tuple[Peer, ...],
    stop: StopSignals,
) -> None:
    from pipeline.data import ensure_synthetic
    from pipeline.train import checkpoint
    from pipeline.train.loop import Trainer

    if grid.rank == 0:
        ensure_synthetic(config.data.train, config.data.synthetic)
    torch.distributed.barrier()
    check_same_files({"data.train": config.data.train, "data.test": config.data.test}, "manifest.json", peers)
    path = None
    if resume:  # the newest intact checkpoint (auto), or this one; its files verified by all ranks
        root = checkpoint.checkpoint_root(config.train.output_dir)
        path = checkpoint.resume_point(root, grid, None if resume == "auto" else Path(resume))
    trainer = Trainer(config, grid, faults, stop, resume=path)
    if path is not None and grid.rank == 0:
        print(f"resumed from {path} at step {trainer.position.step}", flush=True)
    try:
        final = trainer.fit()
    except Preempted:  # the plot of what was logged, then the exit code
        trainer.logbook.close()
        raise
    baseline = trainer.baseline()
    if grid.rank == 0:
        summary = {"final": final, "popularity_baseline": baseline, "step": trainer.position.step}
        if torch.cuda.is_available():  # this rank's peak: backbone, head shard, Adam states, buffers
            summary["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
            print(f"peak GPU memory (rank 0): {summary['gpu_peak_bytes'] / 2**30:.3f} GiB", flush=True)
        (Path(config.train.output_dir) / "final_metrics.json").write_text(
            json.dumps(summary, indent=1) + "\n"
        )
        print(format_summary(final, baseline), flush=True)
    trainer.logbook.close()


def format_summary(final: dict[str, float], baseline: dict[str, float]) -> str:
    keys = ["P@1", "P@3", "P@5", "nDCG@5", "PSP@5", "R@5"]
    model = "  ".join(f"{k} {100 * final[k]:.2f}" for k in keys)
    popular = "  ".join(f"{k} {100 * baseline[k]:.2f}" for k in keys)
    return f"test metrics (%):        {model}\npopularity baseline (%): {popular}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        check_before_start(config)
    except (ConfigError, GridError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        code = run(config, args.resume, args.check)
    except BaseException as e:  # name the rank, then take the whole job down rather than hang it
        if isinstance(e, SystemExit) and not e.code:
            raise
        why = f"{type(e).__name__}: {e}{name_peers_in(str(e))}"
        print(f"[rank {env_rank()}] failed: {why}", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        if detect_launcher() == "mpi":
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(1)
        os._exit(1)
    return code


if __name__ == "__main__":
    sys.exit(main())
