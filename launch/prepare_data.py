"""Convert a data source to WebDataset shards + manifest.json (thin wrapper of `python -m pipeline.data`).

    python launch/prepare_data.py synthetic --out data/demo --num-train 20000 --num-test 2000 \
        --num-features 20000 --num-labels 10000 --seed 0 --shard-size 5000
    python launch/prepare_data.py xmc --input train.txt --out data/amazon670k/train
    python launch/prepare_data.py dense --embeddings X.npy --labels y.txt --out data/emb/train
    python launch/prepare_data.py text --train trn.json.gz --test tst.json.gz --out data/text \
        [--num-labels N] [--label-names labels.txt]      # raw text: OUT/train, OUT/test
"""

import sys

from pipeline.data.cli import main

if __name__ == "__main__":
    sys.exit(main())
