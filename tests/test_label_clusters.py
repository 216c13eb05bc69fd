"""Label clusters for the group-shared FFI layer: the order, its inverse, the planted clusters found."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.collate import Batch
from pipeline.models.label_clusters import LabelOrder, balanced_order, label_centroids


def test_label_order_maps_both_ways_and_keeps_the_markers():
    order = LabelOrder(torch.tensor([3, 0, 2, 1]))
    ids = torch.tensor([[0, 1, 2, 3], [-1, 4, 3, 3]])
    pos = order.positions(ids)
    assert pos.tolist() == [[1, 3, 2, 0], [-1, 4, 0, 0]]  # -1 and 4 (out of range) stay
    assert order.labels(torch.tensor([[1, 3, 2, 0, -1]])).tolist() == [[0, 1, 2, 3, -1]]
    with pytest.raises(ValueError, match="permutation"):
        LabelOrder(torch.tensor([0, 0, 1]))


def planted(clusters: int, size: int, dim: int = 16, noise: float = 0.05) -> tuple[torch.Tensor, ...]:
    """Centroids of `clusters` tight clusters of `size` labels each, shuffled; and each label's cluster."""
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=gen), dim=1)
    member = torch.arange(clusters).repeat_interleave(size)
    perm = torch.randperm(clusters * size, generator=gen)
    member = member[perm]
    x = centres[member] + noise * torch.randn(clusters * size, dim, generator=gen)
    return torch.nn.functional.normalize(x, dim=1), member


@pytest.mark.parametrize("group_size", [8, 4])
def test_balanced_order_finds_planted_clusters(group_size):
    x, member = planted(clusters=8, size=8)
    order = balanced_order(x, group_size, seed=1).order
    assert sorted(order.tolist()) == list(range(64))
    runs = member[order].view(-1, group_size)
    assert bool((runs == runs[:, :1]).all()), runs  # every group inside one planted cluster


def test_balanced_order_with_a_remainder_and_tiny_sets():
    x, _ = planted(clusters=5, size=7)  # 35 labels, groups of 8: four whole, one of 3 at the end
    order = balanced_order(x, 8, seed=0).order
    assert sorted(order.tolist()) == list(range(35))
    assert balanced_order(x[:1], 8, seed=0).order.tolist() == [0]
    assert balanced_order(x[:0], 8, seed=0).order.numel() == 0
    with pytest.raises(ValueError, match="group_size"):
        balanced_order(x, 0, seed=0)


def bow_batch(rows: list[list[int]], labels: list[list[int]]) -> Batch:
    lengths = torch.tensor([len(r) for r in rows])
    return Batch(
        sample_ids=torch.arange(len(rows)),
        valid=torch.ones(len(rows), dtype=torch.bool),
        label_indptr=torch.tensor([0] + [len(lab) for lab in labels]).cumsum(0),
        label_indices=torch.tensor([x for lab in labels for x in lab]),
        feature_indices=torch.tensor([x for r in rows for x in r]),
        feature_offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)[:-1]]),
        feature_weights=torch.ones(int(lengths.sum())),
    )


def test_centroids_follow_the_features_of_the_labels_samples():
    # labels 0 and 1 are carried by samples over features 0-3, labels 2 and 3 by samples over 10-13;
    # label 4 by no sample
    batch = bow_batch(
        [[0, 1, 2], [1, 2, 3], [10, 11], [12, 13, 11]],
        [[0, 1], [1, 0], [2, 3], [3]],
    )
    c = label_centroids([batch], num_labels=5, num_features=20, seed=0, dim=32)
    assert c.shape == (5, 32)
    torch.testing.assert_close(c.norm(dim=1), torch.ones(5))
    sim = c @ c.T
    assert sim[0, 1] > 0.99 and sim[2, 3] > 0.7
    assert sim[0, 2] < 0.6 and sim[1, 3] < 0.6
    order = balanced_order(c[:4], 2, seed=0).order.view(2, 2).sort(dim=1).values
    assert sorted(order.tolist()) == [[0, 1], [2, 3]]


def test_text_batches_cluster_by_co_occurrence():
    batch = Batch(
        sample_ids=torch.arange(4),
        valid=torch.ones(4, dtype=torch.bool),
        label_indptr=torch.tensor([0, 2, 4, 6, 8]),
        label_indices=torch.tensor([0, 1, 0, 1, 2, 3, 3, 2]),
        texts=["a", "b", "c", "d"],
    )
    c = label_centroids([batch], num_labels=4, num_features=0, seed=0)
    assert (c @ c.T)[0, 1] > 0.99 and (c @ c.T)[2, 3] > 0.99
