"""Train an extreme classifier.

    deepspeed --num_gpus 2 launch/train.py --config configs/demo.json         # one node
    deepspeed --hostfile launch/hostfile.example launch/train.py --config ...  # several nodes
    mpirun -np 2 python launch/train.py --config configs/demo.json            # HPC nodes (MPI)

`--set key.path=value` overrides the config. The config is validated before any process starts
talking to another (exit code 2 on an invalid one). A rank that fails prints `[rank N] ...` and the
whole job exits non-zero.

Fault injection, for tests of the failure paths: XMC_FAULT_RANK=N makes rank N fail after start-up,
by raising (XMC_FAULT_KIND=raise, default) or by killing itself with SIGKILL (XMC_FAULT_KIND=kill).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.config import ConfigError, RunConfig, load_config, save_config  # noqa: E402
from pipeline.parallel.distributed import detect_launcher, env_rank, init_distributed  # noqa: E402
from pipeline.parallel.grid import GridError, Layout, build_grid  # noqa: E402
from pipeline.parallel.horovod import init_horovod, shutdown_horovod  # noqa: E402
from pipeline.parallel.selfcheck import run_self_check  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="run config (JSON)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key"
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def check_world_size(config: RunConfig) -> None:
    """Fail before start-up when the model-parallel size cannot divide the launched world."""
    world = os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or "1"
    Layout(int(world), config.parallel.model_parallel)


def maybe_inject_fault(rank: int) -> None:
    if os.environ.get("XMC_FAULT_RANK") == str(rank):
        if os.environ.get("XMC_FAULT_KIND", "raise") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected fault (XMC_FAULT_RANK)")


def run(config: RunConfig) -> None:
    launch = init_distributed()
    grid = build_grid(config.parallel.model_parallel)
    controller = init_horovod(launch.launcher, grid.layout)
    out = Path(config.train.output_dir)
    if grid.rank == 0:
        save_config(config, out / "config.json")
    maybe_inject_fault(grid.rank)
    report = run_self_check(grid) | {"launcher": launch.launcher, "horovod_controller": controller}
    (out / "selfcheck").mkdir(parents=True, exist_ok=True)
    (out / "selfcheck" / f"rank{grid.rank}.json").write_text(json.dumps(report) + "\n")
    if grid.rank == 0:
        print(
            f"self-check ok: {grid.world_size} ranks ({grid.dp} dp x {grid.mp} mp) via {launch.launcher}, "
            f"horovod over {controller}",
            flush=True,
        )
    shutdown_horovod()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        check_world_size(config)
    except (ConfigError, GridError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        run(config)
    except BaseException as e:  # name the rank, then take the whole job down rather than hang it
        if isinstance(e, SystemExit) and not e.code:
            raise
        print(f"[rank {env_rank()}] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        traceback.print_exc()
        sys.stderr.flush()
        if detect_launcher() == "mpi":
            from mpi4py import MPI

            MPI.COMM_WORLD.Abort(1)
        os._exit(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
