"""Convert a data source to WebDataset shards + manifest.json (thin wrapper of `python -m pipeline.data`).

    python launch/prepare_data.py synthetic --out data/demo --num-train 20000 --num-test 2000 \
        --num-features 20000 --num-labels 10000 --seed 0 --shard-size 5000
    python launch/prepare_data.py xmc --input train.txt --out data/amazon670k/train
    python launch/prepare_data.py dense --embeddings X.npy --labels y.txt --out data/emb/train
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.data.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
