"""Data pipeline throughput: conversion and loader samples/s on an Amazon-670K-sized synthetic set.

    python launch/bench.py data [--num-train 490449 --num-features 135909 --num-labels 670091]

Figures: synthetic generation + shard writing, XMC text parsing + shard writing (on `--xmc-samples`
lines written from the same data), and the loader with 1 and 2 DataLoader workers (batch 256, shuffled,
rank 0 of 1), each as samples/s over the whole pass including worker start-up, and per worker.
The target is >= 20,000 BoW samples/s per worker so a training step never waits on data.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from pipeline.data import SyntheticTask, convert_xmc, make_loader, read_manifest, write_synthetic


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="folder for the generated set (default: a temporary one)")
    parser.add_argument("--num-train", type=int, default=490_449)
    parser.add_argument("--num-features", type=int, default=135_909)
    parser.add_argument("--num-labels", type=int, default=670_091)
    parser.add_argument("--shard-size", type=int, default=10_000)
    parser.add_argument("--xmc-samples", type=int, default=50_000, help="lines for the XMC text conversion")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])


def _write_xmc_text(path: Path, task: SyntheticTask, n: int) -> None:
    with open(path, "w") as f:
        f.write(f"{n} {task.num_features} {task.num_labels}\n")
        for c in task.samples(n, stream=0):
            for i in range(c.n):
                labels = ",".join(map(str, c.labels[c.label_indptr[i] : c.label_indptr[i + 1]].tolist()))
                lo, hi = c.feat_indptr[i], c.feat_indptr[i + 1]
                feats = " ".join(
                    f"{j}:{v:.6f}"
                    for j, v in zip(c.feat_idx[lo:hi].tolist(), c.feat_val[lo:hi].tolist(), strict=True)
                )
                f.write(f"{labels} {feats}\n")


def _loader_pass(folder: Path, batch_size: int, workers: int) -> dict:
    loader = make_loader(folder, batch_size, 0, 1, num_workers=workers, shuffle=True, seed=0)
    start = time.perf_counter()
    first = None
    samples = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - start
        samples += batch.num_valid
    seconds = time.perf_counter() - start
    rate = samples / seconds
    print(
        f"loader, {workers} worker(s): {samples} samples in {seconds:.1f} s = {rate:,.0f} samples/s "
        f"({rate / workers:,.0f} per worker; first batch after {first:.2f} s)",
        flush=True,
    )
    return {
        "samples_per_s": round(rate),
        "samples_per_s_per_worker": round(rate / workers),
        "seconds": round(seconds, 2),
        "first_batch_s": round(first, 3),
    }


def run(args: argparse.Namespace) -> dict:
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="xmc-bench-data-")
        out = Path(tmp.name)
    else:
        out = Path(args.out)
    try:
        figures: dict = {
            "num_train": args.num_train,
            "num_features": args.num_features,
            "num_labels": args.num_labels,
            "batch_size": args.batch_size,
        }
        start = time.perf_counter()
        write_synthetic(
            out / "synthetic",
            num_train=args.num_train,
            num_test=1,
            num_features=args.num_features,
            num_labels=args.num_labels,
            shard_size=args.shard_size,
            progress=False,
        )
        seconds = time.perf_counter() - start
        train = out / "synthetic" / "train"
        manifest = read_manifest(train)
        size = sum((train / s.name).stat().st_size for s in manifest.shards)
        figures["convert_synthetic_samples_per_s"] = round(args.num_train / seconds)
        figures["shard_bytes_per_sample"] = round(size / args.num_train)
        print(
            f"synthetic -> shards: {args.num_train} samples in {seconds:.1f} s = "
            f"{args.num_train / seconds:,.0f} samples/s, {size / 2**20:.0f} MiB ({size / args.num_train:.0f} "
            f"bytes/sample, {len(manifest.shards)} shards)",
            flush=True,
        )

        n = min(args.xmc_samples, args.num_train)
        task = SyntheticTask(args.num_features, args.num_labels, seed=0)
        _write_xmc_text(out / "train.txt", task, n)
        start = time.perf_counter()
        convert_xmc(out / "train.txt", out / "xmc", shard_size=args.shard_size, progress=False)
        seconds = time.perf_counter() - start
        figures["convert_xmc_text_samples_per_s"] = round(n / seconds)
        print(
            f"XMC text -> shards: {n} samples in {seconds:.1f} s = {n / seconds:,.0f} samples/s", flush=True
        )

        for workers in args.workers:
            figures[f"loader_{workers}_workers"] = _loader_pass(train, args.batch_size, workers)
        return figures
    finally:
        if tmp is not None:
            tmp.cleanup()
