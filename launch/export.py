"""Export a trained model as one self-contained inference bundle (layout: pipeline/train/bundle.py).

    python launch/export.py --checkpoint runs/demo --out model/
    python launch/export.py --checkpoint runs/demo/checkpoints/step00000200 --out model/ --force
    python launch/predict.py --checkpoint model/ --out pred.jsonl   # at any world size

`--checkpoint` is a run's output folder (its newest complete checkpoint is exported) or one
checkpoint folder. The bundle holds the merged head over the whole label range (no optimizer
state), the backbone's full weights, the resolved config, the training manifest (features, label
frequencies, label names) and, for a transformer, the tokenizer. It is written under a temporary
name and renamed when complete; an existing non-empty `--out` is refused unless `--force`. Errors
end with `export: <cause naming the path>` and exit code 2. In Python:

    from pipeline.train.bundle import load_bundle, predict_topk
    ids, scores = predict_topk(load_bundle("model/"), X, k=5)   # X: CSR [N, features] or texts
"""

from __future__ import annotations

import argparse
import sys

from pipeline.config import ConfigError
from pipeline.data import DataError
from pipeline.hf_folder import ModelFolderError
from pipeline.train.bundle import BundleError, read_bundle, write_bundle
from pipeline.train.checkpoint import CheckpointError

ERRORS = (BundleError, CheckpointError, ConfigError, DataError, ModelFolderError, OSError)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="run output folder or checkpoint folder")
    parser.add_argument("--out", required=True, help="bundle folder to write")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = write_bundle(args.checkpoint, args.out, force=args.force)
    except ERRORS as e:
        print(f"export: {e}", file=sys.stderr)
        return 2
    doc = read_bundle(out)
    size = sum(f["size"] for f in doc["files"].values())
    print(
        f"exported step {doc['step']} of {doc['source']} ({doc['backbone']} backbone, {doc['head']} head, "
        f"{doc['num_labels']} labels) to {out}: {len(doc['files'])} files, {size / 2**20:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
