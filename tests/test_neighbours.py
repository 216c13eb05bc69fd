"""Neighbour votes (`pipeline.models.neighbours`) against a plain float64 loop over every query.

The index's votes for a label slice, in a head's own label order, must equal the reference built
sample by sample from the definition: cosine to every training embedding, the k best, weights
max(cos, 0) ** power normalised over them, each neighbour's labels credited its weight.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.models.label_clusters import LabelOrder
from pipeline.models.neighbours import NeighbourIndex, NeighbourVotes
from pipeline.parallel.label_range import LabelRange

C = 37


def random_index(n: int, d: int, seed: int) -> NeighbourIndex:
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    counts = torch.randint(0, 5, (n,), generator=g)  # some samples carry no label
    indices = torch.randint(0, C, (int(counts.sum()),), generator=g)
    return NeighbourIndex(emb, torch.nn.functional.pad(counts.cumsum(0), (1, 0)), indices)


def reference_votes(index: NeighbourIndex, queries: torch.Tensor, k: int, power: float) -> torch.Tensor:
    """[N, C] float64, by the definition, one query at a time."""
    keys = index.embeddings.double()
    out = torch.zeros(queries.shape[0], C, dtype=torch.float64)
    for i, q in enumerate(queries.double()):
        cos = keys @ (q / q.norm())
        best = cos.argsort(descending=True)[: min(k, keys.shape[0])]
        w = cos[best].clamp(min=0) ** power
        w = w / w.sum() if w.sum() > 0 else w
        for j, wj in zip(best.tolist(), w.tolist(), strict=True):
            for label in index.label_indices[index.label_indptr[j] : index.label_indptr[j + 1]].tolist():
                out[i, label] += wj
    return out


@pytest.mark.parametrize("k, power", [(1, 1.0), (5, 4.0), (12, 0.0), (500, 2.0)])
def test_votes_equal_the_reference_on_every_label_slice(k, power):
    index = random_index(60, 8, seed=k)
    queries = 3 * torch.randn(9, 8, generator=torch.Generator().manual_seed(1))  # not unit length
    want = reference_votes(index, queries, k, power)
    for start, stop in [(0, C), (0, 10), (10, 37), (20, 20)]:
        got = index.votes(queries, k, power, LabelRange(start, stop, C), chunk=4)
        assert got.dtype == torch.float32 and got.shape == (9, stop - start)
        torch.testing.assert_close(got.double(), want[:, start:stop], rtol=1e-5, atol=1e-6)
    assert (want > 0).any()


def test_votes_follow_the_heads_label_order():
    """A head that scores labels in its own order (a clustered FFI head) gets the votes in that order."""
    index = random_index(40, 6, seed=3)
    queries = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    order = LabelOrder(torch.randperm(C, generator=torch.Generator().manual_seed(4)))
    want = reference_votes(index, queries, 7, 4.0)[:, order.order]  # column p = label order[p]
    votes = NeighbourVotes(index, k=7, weight=0.5, power=4.0)
    got = votes.scores(queries, LabelRange(5, 30, C), order)
    torch.testing.assert_close(got.double(), 0.5 * want[:, 5:30], rtol=1e-5, atol=1e-6)


def test_votes_of_no_query_and_a_saved_index(tmp_path):
    index = random_index(20, 4, seed=5)
    assert index.votes(torch.zeros(0, 4), 3, 1.0, LabelRange(0, C, C)).shape == (0, C)
    index.save(tmp_path / "neighbours.pt")
    again = NeighbourIndex.load(tmp_path / "neighbours.pt")
    q = torch.randn(3, 4)
    assert torch.equal(
        again.votes(q, 3, 1.0, LabelRange(0, C, C)), index.votes(q, 3, 1.0, LabelRange(0, C, C))
    )


def test_an_inconsistent_index_is_refused():
    with pytest.raises(ValueError, match="do not describe the same samples"):
        NeighbourIndex(
            torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
        )
    with pytest.raises(ValueError, match="does not end at the number of label indices"):
        NeighbourIndex(torch.zeros(2, 2), torch.tensor([0, 1, 3]), torch.zeros(2, dtype=torch.int64))
