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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from pipeline.config import load_config, save_config  # noqa: E402
from pipeline.data import make_loader, read_manifest  # noqa: E402
from pipeline.models.build import build_backbone, build_head  # noqa: E402
from pipeline.models.recovery import recover_dense_head  # noqa: E402
from pipeline.parallel.distributed import collective_device, init_distributed  # noqa: E402
from pipeline.parallel.gather_labels import gather_labels  # noqa: E402
from pipeline.parallel.grid import build_grid  # noqa: E402
from pipeline.parallel.horovod import init_horovod, shutdown_horovod  # noqa: E402
from pipeline.parallel.label_range import split_labels  # noqa: E402
from pipeline.parallel.losses import distributed_loss  # noqa: E402
from pipeline.parallel.model_parallel import gather_embeddings  # noqa: E402
from pipeline.train import checkpoint as ckpt  # noqa: E402
from pipeline.train.evaluate import embed, evaluate, padded_labels  # noqa: E402
from pipeline.train.metrics import XMCMetrics  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="output folder of the RP training run")
    parser.add_argument("--finetune-steps", type=int, default=None, help="default: model.rp.finetune_steps")
    parser.add_argument("--compare", default=None, help="output folder of a dense run, for the report")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def group_batches(backbone, loader, grid, batch_size: int):
    """(gathered embeddings, gathered labels CSR, gathered validity) of the model-parallel group."""
    dtype = next(backbone.parameters()).dtype
    for batch in loader:
        with torch.no_grad():  # not around the yield: a caller that stops early would inherit it
            h = gather_embeddings(embed(backbone, batch, batch_size, dtype), grid.mp_group)
        labels = (t.to(h.device) for t in padded_labels(batch, batch_size))
        yield (h, *gather_labels(*labels, grid.mp_group))


def calibrate_scale(dense, loss_kind: str, label_range, group, batches, max_batches: int = 16) -> float:
    """The factor a > 0 (a power of 2 in 2^-20 .. 2^8) that minimises the training loss of
    a * (W h) + b over the first batches of training data.

    The dual formula gives W's direction; its scale is right only at the optimum of the regularised
    slim problem. After a finite number of Adam steps the slim model is not there and W h can be off
    by orders of magnitude, which softmax-type losses (and a fine-tune's first steps) punish. At the
    optimum the search returns about 1. Every rank of the group evaluates the same candidates (the
    loss all-reduces over the group); sums over data-parallel replicas are all-reduced at the end."""
    factors = torch.tensor([2.0**e for e in range(-20, 9)], dtype=torch.float64)
    # summed losses, then the sample count; on the device of the collectives
    totals = torch.zeros(len(factors) + 1, dtype=torch.float64, device=dense.weight.device)
    bias = dense.bias if dense.bias is not None else 0.0
    with torch.no_grad():
        for i, (h, indptr, indices, valid) in enumerate(batches):
            if i == max_batches:
                break
            wh = torch.nn.functional.linear(h, dense.weight)
            n = valid.sum()
            for j, a in enumerate(factors.tolist()):
                loss = distributed_loss(loss_kind, wh * a + bias, indptr, indices, label_range, valid, group)
                totals[j] += loss.double() * n
            totals[-1] += n
    if group is not None:  # each model-parallel group saw its own batches: sum over the whole world
        totals /= dist.get_world_size(group)
    dist.all_reduce(totals)
    return float(factors[int(torch.argmin(totals[:-1]))])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run)
    config = load_config(run_dir / "config.json")
    if config.model.head != "rp":
        raise SystemExit(f"recover: {run_dir} trained a {config.model.head!r} head, not 'rp'")
    checkpoint = ckpt.latest_checkpoint(ckpt.checkpoint_root(run_dir))
    if checkpoint is None:
        raise SystemExit(f"recover: no complete checkpoint under {run_dir}")
    meta = ckpt.read_meta(checkpoint)
    launch = init_distributed()
    grid = build_grid(meta["model_parallel"])
    if grid.world_size != meta["world_size"]:
        raise SystemExit(f"recover: run with {meta['world_size']} ranks, as the RP run was")
    manifest = read_manifest(config.data.train)
    label_range = split_labels(manifest.num_labels, grid.mp, grid.mp_rank)
    batch_size = config.data.batch_size

    backbone = build_backbone(config.model, manifest.feature_kind, manifest.num_features)
    backbone.load_state_dict(torch.load(checkpoint / "backbone.pt", map_location="cpu", weights_only=True))
    device = collective_device()  # the GPU of this rank under nccl, else the CPU
    backbone.to(device).eval()
    shard = torch.load(
        checkpoint / "head" / f"rank{grid.rank:05d}.pt", map_location="cpu", weights_only=False
    )
    slim = build_head(config.model, label_range, seed=config.train.seed)
    slim.load_state_dict(shard["head"])
    slim.to(device)

    def train_batches():
        return make_loader(config.data.train, batch_size, grid.rank, grid.world_size, shuffle=False)

    dense = recover_dense_head(
        slim,
        group_batches(backbone, train_batches(), grid, batch_size),
        config.model.rp.recovery_lambda,
        grid.mp_group,
        grid.dp_group,
        config.model.loss,
    )

    scale = calibrate_scale(
        dense,
        config.model.loss,
        label_range,
        grid.mp_group,
        group_batches(backbone, train_batches(), grid, batch_size),
    )
    with torch.no_grad():
        dense.weight.mul_(scale)

    def test_metrics(head) -> dict[str, float]:
        test = make_loader(config.data.test, batch_size, grid.rank, grid.world_size, shuffle=False)
        metrics = XMCMetrics(manifest.num_labels, manifest.label_frequencies, manifest.num_samples)
        return evaluate(backbone, head, test, grid, label_range, batch_size, metrics)

    report = {"slim": test_metrics(slim), "recovered": test_metrics(dense), "scale": scale}

    # The recovered head becomes an ordinary dense-head run that predict and train can continue.
    out = run_dir / "recovered"
    finetune = config.model.rp.finetune_steps if args.finetune_steps is None else args.finetune_steps
    step = meta["step"]
    dense_config = config.model_copy(deep=True)
    dense_config.model.head = "dense"
    dense_config.train.output_dir = str(out)
    dense_config.train.steps = step + finetune
    target = ckpt.checkpoint_root(out) / f"step{step:08d}"
    tmp = target.with_name(".tmp-" + target.name)
    if grid.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        (tmp / "head").mkdir(parents=True)
        save_config(dense_config, out / "config.json")
        shutil.copytree(checkpoint / "backbone", tmp / "backbone")
        shutil.copy2(checkpoint / "backbone.pt", tmp / "backbone.pt")
    dist.barrier()
    recovered_shard = {**shard, "head": dense.state_dict(), "optimizer": {}, "residuals": {}}
    torch.save(recovered_shard, tmp / "head" / f"rank{grid.rank:05d}.pt")
    dist.barrier()
    if grid.rank == 0:
        (tmp / "meta.json").write_text(json.dumps({**meta, "head": "dense"}, indent=1) + "\n")
        tmp.rename(target)
    dist.barrier()

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
        print(f"recovered W scaled by {scale:.4g} (the loss-minimising power of 2)", flush=True)
        for name, values in report.items():
            if not isinstance(values, dict):
                continue
            shown = "  ".join(f"{k} {100 * values[k]:.2f}" for k in ("P@1", "P@3", "P@5", "PSP@5"))
            print(f"{name:>24}: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
