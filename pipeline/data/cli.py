"""Command line of the converters: `python -m pipeline.data` and `launch/prepare_data.py`.

Bad input prints one `error: file:line: ...` line to stderr and exits with status 2; nothing that
looks complete is left behind (see ShardWriter).
"""

from __future__ import annotations

import argparse
import sys

from pipeline.data.convert import convert_dense, convert_text, convert_xmc, write_synthetic
from pipeline.data.errors import DataError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_data", description="Convert a data source to WebDataset shards + manifest.json."
    )
    sub = parser.add_subparsers(dest="source", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard")
        p.add_argument("--block-size", type=int, default=64, help="samples per tar member")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    xmc = sub.add_parser("xmc", help="Extreme Classification Repository BoW text file (.txt or .txt.gz)")
    xmc.add_argument("--input", required=True)
    common(xmc)
    dense = sub.add_parser("dense", help="dense embeddings .npy [N, d] + label file (one line per row)")
    dense.add_argument("--embeddings", required=True)
    dense.add_argument("--labels", required=True)
    dense.add_argument("--num-labels", type=int, default=None, help="default: largest label id + 1")
    common(dense)
    text = sub.add_parser(
        "text",
        help="raw-text JSON lines (.json/.jsonl, optionally .gz): XMC repository trn.json/tst.json "
        "(title, content, target_ind) or {text, labels}: OUT/train and OUT/test",
    )
    text.add_argument("--train", required=True, help="training file")
    text.add_argument("--test", default=None, help="test file (its labels must be the training file's)")
    text.add_argument(
        "--num-labels",
        type=int,
        default=None,
        help="integer label ids: default the --label-names count, else the largest training id + 1",
    )
    text.add_argument(
        "--label-names", default=None, help="integer label ids: names, one per line (line i = id i)"
    )
    common(text)
    syn = sub.add_parser("synthetic", help="synthetic Amazon-670K-like set: OUT/train and OUT/test")
    syn.add_argument("--num-train", type=int, default=20_000)
    syn.add_argument("--num-test", type=int, default=2_000)
    syn.add_argument("--num-features", type=int, default=20_000)
    syn.add_argument("--num-labels", type=int, default=10_000)
    syn.add_argument("--seed", type=int, default=0)
    common(syn)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    opts = dict(shard_size=args.shard_size, block_size=args.block_size, progress=not args.no_progress)
    if args.shard_size < 1 or args.block_size < 1:
        print("error: --shard-size and --block-size must be positive", file=sys.stderr)
        return 2
    try:
        if args.source == "xmc":
            manifests = {"": convert_xmc(args.input, args.out, **opts)}
        elif args.source == "dense":
            manifests = {
                "": convert_dense(args.embeddings, args.labels, args.out, num_labels=args.num_labels, **opts)
            }
        elif args.source == "text":
            manifests = convert_text(
                args.train,
                args.out,
                test_input=args.test,
                num_labels=args.num_labels,
                label_names_file=args.label_names,
                **opts,
            )
        else:
            manifests = write_synthetic(
                args.out,
                num_train=args.num_train,
                num_test=args.num_test,
                num_features=args.num_features,
                num_labels=args.num_labels,
                seed=args.seed,
                **opts,
            )
    except DataError as exn:
        print(f"error: {exn}", file=sys.stderr)
        return 2
    for m in manifests.values():
        features = "raw text" if m.feature_kind == "text" else f"{m.num_features} {m.feature_kind} features"
        named = f" (names in {m.label_names_file})" if m.label_names_file else ""
        labels = f"{m.num_labels} labels{named}"
        print(f"{m.path}: {m.num_samples} samples, {features}, {labels}, {len(m.shards)} shards")
    return 0
