"""Seeded block initialisation: every head's label-sharded tensors start the same whatever the split."""

import pytest
import torch

from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.ffi import FFIHead
from pipeline.models.heads.rp import RPHead
from pipeline.parallel.block_init import BLOCK, block_rows, mix, uniform
from pipeline.parallel.label_range import LabelRange, split_labels

NUM_LABELS = 2 * BLOCK + 77  # three blocks, the last one partial; mp = 3 cuts inside blocks


def shards(make, mp: int) -> list[dict[str, torch.Tensor]]:
    return [make(split_labels(NUM_LABELS, mp, r)).state_dict() for r in range(mp)]


HEADS = {
    "dense": lambda lr: DenseHead(16, lr, seed=5),
    "rp": lambda lr: RPHead(16, lr, 4, seed=5),
    "ffi": lambda lr: FFIHead(16, lr, hidden=32, fan_in=4, seed=5),
}
SHARDED = {"dense": ["weight", "bias"], "rp": ["weight"], "ffi": ["sparse.values", "sparse.indices"]}


@pytest.mark.parametrize("head", sorted(HEADS))
def test_any_split_holds_the_single_process_head(head):
    (whole,) = shards(HEADS[head], 1)
    for mp in (2, 3, 5):
        parts = shards(HEADS[head], mp)
        for key in SHARDED[head]:
            assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), (head, mp, key)


def test_block_rows_cuts_blocks_and_streams_differ():
    draw = lambda gen, n: (uniform(gen, (n, 3), 1.0),)  # noqa: E731
    (whole,) = block_rows(LabelRange(0, NUM_LABELS, NUM_LABELS), 9, 0, draw)
    (part,) = block_rows(LabelRange(BLOCK - 5, BLOCK + 5, NUM_LABELS), 9, 0, draw)
    assert whole.shape == (NUM_LABELS, 3) and torch.equal(part, whole[BLOCK - 5 : BLOCK + 5])
    (other,) = block_rows(LabelRange(0, NUM_LABELS, NUM_LABELS), 9, 1, draw)
    assert not torch.equal(other, whole)  # another stream: other values
    (empty,) = block_rows(LabelRange(7, 7, NUM_LABELS), 9, 0, draw)
    assert empty.shape == (0, 3)
    seeds = {mix(s, t, b) for s in range(4) for t in range(4) for b in range(4)}
    assert len(seeds) == 64 and all(0 <= x < 1 << 63 for x in seeds)
    assert whole.abs().max() <= 1.0 and whole.dtype == torch.float32
