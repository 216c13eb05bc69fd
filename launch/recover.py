"""Recover a full dense classifier from a trained random-projection (RP) run, then fine-tune it.

    deepspeed --num_gpus 2 launch/recover.py --run runs/amazon670k_rp [--compare runs/amazon670k_dense]
    mpirun -np 2 python launch/recover.py --run runs/amazon670k_rp

Run with the world size of the RP run. One streaming pass over the training data builds W (C x d,
split by label range as in training) from the slim model's loss gradients (dual recovery, see
`pipeline/models/recovery.py`; lambda = model.rp.recovery_lambda). The result is written as an
ordinary training run with a dense head, `<run>/recovered/` (config.json and a checkpoint whose
backbone is the RP run's), so `launch/predict.py` and `launch/train.py --resume auto` work on it.
With model.rp.finetune_steps > 0 (or --finetune-steps) the dense head is then fine-tuned for that
many steps. Printed at the end, on the test set: the slim RP head, the recovered head, the fine-tuned
head and, with --compare, the final metrics of a dense head trained directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch

from pipeline.config import save_config
from pipeline.data import make_loader
from pipeline.models.build import loss_kind
from pipeline.models.group_batch import group_batches
from pipeline.models.recovery import back_projection, calibrate_recovery, recover_dense_head
from pipeline.parallel.distributed import collective_device, init_distributed
from pipeline.parallel.grid import build_grid
from pipeline.parallel.horovod import init_horovod, shutdown_horovod
from pipeline.train import checkpoint as ckpt
from pipeline.train.evaluate import evaluate
from pipeline.train.metrics import XMCMetrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="output folder of the RP training run")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: model.rp.finetune_steps")
    parser.add_argument("--compare", default=None, help="output folder of a dense run, for the report")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run)
    try:
        checkpoint, _ = ckpt.resolve_checkpoint(run_dir)
    except ckpt.CheckpointError as e:
        raise SystemExit(f"recover: {e}") from None
    meta = ckpt.read_meta(checkpoint)
    if meta["head"] != "rp":
        raise SystemExit(f"recover: {run_dir} trained a {meta['head']!r} head, not 'rp'")
    launch = init_distributed()
    grid = build_grid(meta["model_parallel"])
    if grid.world_size != meta["world_size"]:
        raise SystemExit(f"recover: run with {meta['world_size']} ranks, as the RP run was")
    model = ckpt.load_for_inference(checkpoint, grid, collective_device())
    config, backbone, slim, label_range = model.config, model.backbone, model.head, model.label_range
    batch_size = config.data.batch_size

    def train_groups():
        batches = make_loader(
            config.data.train,
            batch_size,
            grid.rank,
            grid.world_size,
            shuffle=False,
            tokenizer=model.tokenizer,
        )
        return group_batches(backbone, batches, grid, batch_size)

    lam, loss = config.model.rp.recovery_lambda, loss_kind(config.model)
    dense = recover_dense_head(slim, train_groups(), lam, grid.mp_group, grid.dp_group, loss)
    scale, mix = calibrate_recovery(dense.weight, slim, loss, label_range, grid.mp_group, train_groups())
    with torch.no_grad():
        dense.weight.mul_(scale).add_(back_projection(slim), alpha=mix)

    manifest = model.manifest

    def test_metrics(head) -> dict[str, float]:
        test = make_loader(
            config.data.test, batch_size, grid.rank, grid.world_size, shuffle=False, tokenizer=model.tokenizer
        )
        metrics = XMCMetrics(manifest.num_labels, manifest.label_frequencies, manifest.num_samples)
        return evaluate(backbone, head, test, grid, label_range, batch_size, metrics)

    report = {
        "slim": test_metrics(slim),
        "recovered": test_metrics(dense),
        "scale": scale,
        "back_projection": mix,
    }

    # The recovered head becomes an ordinary dense-head run that predict and train can continue.
    out = run_dir / "recovered"
    finetune = config.model.rp.finetune_steps if args.finetune_steps is None else args.finetune_steps
    step = meta["step"]
    dense_config = config.model_copy(deep=True)
    dense_config.model.head = "dense"
    dense_config.train.output_dir = str(out)
    dense_config.train.steps, dense_config.train.epochs = step + finetune, 0.0
    if grid.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        save_config(dense_config, out / "config.json")
    shard = {**model.shard, "head": dense.state_dict(), "optimizer": {}, "residuals": {}}
    shard.pop("own")
    target = ckpt.write_checkpoint(
        ckpt.checkpoint_root(out),
        step,
        grid,
        ckpt.copied_backbone(checkpoint),
        shard,
        {"num_labels": meta["num_labels"], "head": "dense"},
    )

    if finetune:
        from pipeline.train.loop import Trainer

        init_horovod(launch.launcher, grid.layout)
        trainer = Trainer(dense_config, grid)
        trainer.restore(target)
        report["finetuned"] = trainer.fit()
        trainer.logbook.close()
        shutdown_horovod()
    if args.compare:
        report["dense_trained_directly"] = json.loads(
            (Path(args.compare) / "final_metrics.json").read_text()
        )["final"]
    if grid.rank == 0:
        (out / "recovery_report.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"recovered W = {scale:.4g} W_dual + {mix:g} V R^T (the training-loss minimiser)", flush=True)
        for name, values in report.items():
            if not isinstance(values, dict):
                continue
            shown = "  ".join(f"{k} {100 * values[k]:.2f}" for k in ("P@1", "P@3", "P@5", "PSP@5"))
            print(f"{name:>24}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
