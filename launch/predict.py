"""Top-k predictions from a checkpoint or an inference bundle, at any world size: shards or raw text.

    python launch/predict.py --checkpoint runs/demo --data data/demo/test --out runs/demo/pred.jsonl
    python launch/predict.py --checkpoint runs/text_minilm --text "tool to resize images" --text "..."
    python launch/predict.py --checkpoint runs/text_minilm --input new.jsonl --out pred.jsonl
    python launch/predict.py --checkpoint model/ --out pred.jsonl   # a bundle of launch/export.py
    deepspeed --num_gpus 2 launch/predict.py --checkpoint runs/demo ...   # labels split over 2 ranks
    mpirun -np 2 python launch/predict.py --checkpoint runs/demo ...
    python launch/predict.py --checkpoint runs/seed0 --checkpoint runs/seed1 ...  # an ensemble

`--checkpoint` is a run's output folder (its newest complete checkpoint is used), one checkpoint
folder, or an inference bundle of `launch/export.py`. The backbone comes from the full weights, the
head (a checkpoint's shards, or a bundle's whole head) is cut to this world (every rank scores a
label range). Raw text (a run with a transformer backbone): `--text` (repeatable) or `--input`, JSON
lines in the formats `prepare_data.py text` reads (`text`, or `title`/`content`; labels optional),
tokenized by the run's own tokenizer. Without `--out` the top-k are printed, with label names when
the run's training data (or the bundle) has a label vocabulary. Output by extension: `.jsonl`, one
line per sample `{"id": sample id, "labels": [...], "scores": [...]}` (plus `"names"` with a
vocabulary); `.npy`, top-k label ids [N, k] in sample-id order (scores beside it in
`*_scores.npy`). When the inputs carry labels, the metrics are printed and written to
`<out>.metrics.json`.

A run with `model.neighbours.k > 0` adds the votes of the nearest training samples to its head's
logits (`pipeline/models/neighbours.py`): from a run folder they are built in one pass over its
training shards, a bundle carries them; `--neighbours K` changes k, 0 scores with the head alone.
Several `--checkpoint`s are an ensemble: independently trained models (e.g. other `train.seed`s) over
the same labels and features, each with its own votes, ranked by the sum of their scores; the
inputs are read as the first one reads them.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch.distributed as dist

from pipeline.data import make_loader, read_label_names, read_text_rows, text_batches
from pipeline.models.neighbours import NeighbourVotes, neighbour_votes
from pipeline.parallel.distributed import collective_device, init_distributed
from pipeline.parallel.grid import ProcessGrid, build_grid
from pipeline.train import bundle
from pipeline.train import checkpoint as ckpt
from pipeline.train.checkpoint import InferenceModel
from pipeline.train.evaluate import Member, predict, shared_label_order
from pipeline.train.metrics import XMCMetrics


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        action="append",
        help="run output folder, checkpoint folder or inference bundle; repeated: an ensemble, whose "
        "members (trained on the same labels and features) score the sum of their scores",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", default=None, help="shards to predict (default: the run's test set)")
    source.add_argument("--text", action="append", default=None, help="a raw text to predict (repeatable)")
    source.add_argument("--input", default=None, help="JSON lines of raw texts (labels optional)")
    parser.add_argument("--out", default=None, help="predictions file, .jsonl or .npy (default: print)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's batch size")
    parser.add_argument(
        "--neighbours",
        type=int,
        default=None,
        metavar="K",
        help="votes of the K nearest training samples (default: the run's model.neighbours.k; 0: the head "
        "alone); a run folder builds them from its training shards, a bundle reads its own",
    )
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        checkpoints = [resolve(path) for path in args.checkpoint]
    except (ckpt.CheckpointError, bundle.BundleError) as e:
        raise SystemExit(f"predict: {e}") from None
    init_distributed()
    grid = build_grid(dist.get_world_size())  # every rank scores its own label range
    device = collective_device()
    models = [
        (bundle.load_bundle if bundle.is_bundle(c) else ckpt.load_for_inference)(c, grid, device)
        for c in checkpoints
    ]
    model = models[0]  # its config, training set and tokenizer read the inputs
    check_members(models)
    config, train_manifest, meta, label_range = model.config, model.manifest, model.meta, model.label_range
    checkpoint = model.checkpoint

    batch_size = args.batch_size or config.data.batch_size
    names = read_label_names(train_manifest)  # the training set's, or the copy in a bundle
    members = [Member(m.backbone, m.head, votes_for(args, m, grid, batch_size)) for m in models]
    texts: list[str] | None = None
    if args.text is not None or args.input is not None:
        if model.tokenizer is None:
            raise SystemExit(
                f"predict: {checkpoint} has a {config.model.backbone} backbone; raw text needs a transformer"
            )
        try:
            texts, labels = (
                (args.text, None)
                if args.text is not None
                else read_text_rows(args.input, names, meta["num_labels"])
            )
            batches = text_batches(texts, model.tokenizer, batch_size, grid.rank, grid.world_size, labels)
        except ValueError as e:  # DataError (file:line) or an empty --text
            raise SystemExit(f"predict: {e}") from None
    else:
        source = args.data or config.data.test
        batches = make_loader(
            source, batch_size, grid.rank, grid.world_size, shuffle=False, tokenizer=model.tokenizer
        )
    metrics = XMCMetrics(meta["num_labels"], train_manifest.label_frequencies, train_manifest.num_samples)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    labelled = False
    for batch, scores, ids in predict(members, batches, grid, label_range, batch_size, args.k):
        keep = batch.valid
        rows.append((batch.sample_ids[keep].numpy(), ids[keep].numpy(), scores[keep].numpy()))
        metrics.update(ids, batch.label_indptr, batch.label_indices, batch.valid)
        labelled = labelled or batch.label_indices.numel() > 0
    found = metrics.compute(group=dist.group.WORLD)

    everything: list = [None] * grid.world_size
    dist.all_gather_object(everything, rows)
    if grid.rank == 0:
        rows = [r for part in everything for r in part]
        if args.out:
            write_predictions(Path(args.out), rows, names)
        else:
            print_predictions(rows, names, texts)
        if labelled:
            if args.out:
                Path(str(args.out) + ".metrics.json").write_text(json.dumps(found, indent=1) + "\n")
            print("  ".join(f"{k} {100 * v:.2f}" for k, v in found.items()), flush=True)
    dist.barrier()
    return 0


def resolve(path: str) -> Path:
    """The checkpoint folder of a run or checkpoint folder, or a bundle folder (format checked)."""
    if bundle.is_bundle(path):
        bundle.read_bundle(path)
        return Path(path)
    return ckpt.resolve_checkpoint(path)[0]


def check_members(models: list[InferenceModel]) -> None:
    """An ensemble's members score the same labels from the same inputs."""
    first = models[0].manifest
    for other in models[1:]:
        m = other.manifest
        if (m.num_labels, m.num_features, m.feature_kind) != (
            first.num_labels,
            first.num_features,
            first.feature_kind,
        ):
            raise SystemExit(
                f"predict: ensemble members differ: {models[0].checkpoint} has {first.num_labels} labels and "
                f"{first.num_features} {first.feature_kind} features, {other.checkpoint} {m.num_labels} and "
                f"{m.num_features} {m.feature_kind}"
            )
    try:
        shared_label_order([Member(m.backbone, m.head) for m in models])
    except ValueError as e:
        raise SystemExit(f"predict: {e}") from None


def votes_for(
    args: argparse.Namespace, model: InferenceModel, grid: ProcessGrid, batch_size: int
) -> NeighbourVotes | None:
    """The neighbour votes to add: the bundle's, or built from the run's training shards; None for the
    head alone."""
    settings = model.config.model.neighbours
    if args.neighbours is not None:
        if args.neighbours < 0:
            raise SystemExit(
                f"predict: --neighbours {args.neighbours}: expected a k >= 0 (0: the head alone)"
            )
        settings = settings.model_copy(update={"k": args.neighbours})
    if settings.k == 0:
        return None
    if model.neighbours is not None:
        return replace(model.neighbours, k=settings.k)
    if bundle.is_bundle(model.checkpoint):
        raise SystemExit(
            f"predict: {model.checkpoint} holds no neighbour index (exported with model.neighbours.k = 0)"
        )
    train = model.config.data.train
    try:
        batches = make_loader(
            train, batch_size, grid.rank, grid.world_size, shuffle=False, tokenizer=model.tokenizer
        )
        return neighbour_votes(settings, model.backbone, batches, grid, batch_size)
    except (OSError, ValueError) as e:  # DataError: a moved or damaged training set
        raise SystemExit(
            f"predict: the neighbour votes need the run's training shards {train}: {e}"
        ) from None


Rows = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per batch: sample ids [n], top-k ids, scores [n, k]


def in_order(rows: Rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows of all ranks as (sample ids, top-k ids, scores), in sample-id order."""
    sample_ids = np.concatenate([r[0] for r in rows])
    order = np.argsort(sample_ids, kind="stable")
    return (
        sample_ids[order],
        np.concatenate([r[1] for r in rows])[order],
        np.concatenate([r[2] for r in rows])[order],
    )


def label_name(names: list[str] | None, label: int) -> str:
    return names[label] if names is not None and 0 <= label < len(names) else str(label)


def print_predictions(rows: Rows, names: list[str] | None, texts: list[str] | None) -> None:
    """One block per sample: its text (or id), then `label  score` per prediction."""
    for sid, top, sc in zip(*in_order(rows), strict=True):
        print(texts[sid] if texts is not None else f"sample {sid}")
        for label, score in zip(top.tolist(), sc.tolist(), strict=True):
            if label >= 0:
                print(f"  {label_name(names, label)}\t{score:.4f}")
    sys.stdout.flush()


def write_predictions(out: Path, rows: Rows, names: list[str] | None = None) -> None:
    """Rows of all ranks, in sample-id order, written under a temporary name and renamed."""
    sample_ids, ids, scores = in_order(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if out.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, ids)
        scores_file = out.with_name(out.stem + "_scores.npy")
        with open(scores_file.with_name(scores_file.name + ".partial"), "wb") as f:
            np.save(f, scores)
        scores_file.with_name(scores_file.name + ".partial").replace(scores_file)
    else:
        with open(tmp, "w") as f:
            for sid, top, sc in zip(sample_ids, ids, scores, strict=True):
                line = {"id": int(sid), "labels": top.tolist(), "scores": sc.tolist()}
                if names is not None:
                    line["names"] = [label_name(names, i) for i in top.tolist()]
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    sys.exit(main())
