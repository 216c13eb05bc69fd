"""XMC metrics against hand-computed values, the propensity formula, and the distributed reduction.

Hand case (labels 0..5, k = 1 and 3), discounts 1, 1/log2(3), 1/2:
  s0: y = {0, 2},       predicted [2, 1, 0]    hits 1 0 1
  s1: y = {4},          predicted [0, 4, 5]    hits 0 1 0   (fewer labels than k)
  s2: y = {},           predicted [0, 1, 2]    no labels: counts with 0
  s3: y = {1, 3, 5, 0}, predicted [5, -1, -1]  hits 1 0 0   (fewer predictions than k)
  s4: padding (valid = False): ignored
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from pipeline.parallel.grid import build_grid
from pipeline.parallel.label_range import split_labels
from pipeline.parallel.topk import distributed_topk
from pipeline.train.metrics import XMCMetrics, popularity_baseline, propensities
from tests.multiproc import run_ranks

FREQ = torch.tensor([10.0, 5, 1, 0, 3, 2])
NUM_TRAIN = 20
IDS = torch.tensor([[2, 1, 0], [0, 4, 5], [0, 1, 2], [5, -1, -1], [0, 1, 2]])
INDPTR = torch.tensor([0, 2, 3, 3, 7, 8])
INDICES = torch.tensor([0, 2, 4, 1, 3, 5, 0, 0])
VALID = torch.tensor([True, True, True, True, False])
L3 = math.log2(3)


def hand_metrics() -> dict[str, float]:
    m = XMCMetrics(6, FREQ, NUM_TRAIN, ks=(1, 3))
    m.update(IDS[:2], INDPTR[:3], INDICES[:3], VALID[:2])  # two batches: accumulation
    m.update(IDS[2:], INDPTR[2:] - INDPTR[2], INDICES[3:], VALID[2:])
    return m.compute()


def test_plain_metrics_by_hand():
    got = hand_metrics()
    idcg2, idcg3 = 1 + 1 / L3, 1 + 1 / L3 + 1 / 2
    expected = {
        "P@1": (1 + 0 + 0 + 1) / 4,
        "P@3": (2 / 3 + 1 / 3 + 0 + 1 / 3) / 4,
        "R@1": (1 / 2 + 0 + 0 + 1 / 4) / 4,
        "R@3": (2 / 2 + 1 / 1 + 0 + 1 / 4) / 4,
        "nDCG@1": (1 + 0 + 0 + 1) / 4,
        "nDCG@3": ((1 + 1 / 2) / idcg2 + (1 / L3) / 1 + 0 + 1 / idcg3) / 4,
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_propensity_scored_metrics_by_hand():
    got = hand_metrics()
    w = (1 / propensities(FREQ, NUM_TRAIN)).tolist()  # rarer labels weigh more: w3 > w2 > w5 > w4 > w1 > w0
    assert w[3] > w[2] > w[5] > w[4] > w[1] > w[0]
    idcg2, idcg3 = 1 + 1 / L3, 1 + 1 / L3 + 1 / 2
    # Best achievable: the true labels in decreasing weight (s0: 2, 0; s1: 4; s3: 3, 5, 1, 0).
    expected = {
        "PSP@1": (w[2] + w[5]) / (w[2] + w[4] + w[3]),
        "PSP@3": (w[2] + w[0] + w[4] + w[5]) / (w[2] + w[0] + w[4] + w[3] + w[5] + w[1]),
        "PSnDCG@1": (w[2] + w[5]) / (w[2] + w[4] + w[3]),
        "PSnDCG@3": ((w[2] + w[0] / 2) / idcg2 + w[4] / L3 + w[5] / idcg3)
        / ((w[2] + w[0] / L3) / idcg2 + w[4] + (w[3] + w[5] / L3 + w[1] / 2) / idcg3),
    }
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_propensity_formula():
    # Jain et al. 2016 with N = 20, A = 0.55, B = 1.5: C = (ln 20 - 1) * 2.5^0.55 = 3.30347...
    c = (math.log(20) - 1) * 2.5**0.55
    assert c == pytest.approx(3.303466, abs=1e-5)
    p = propensities(torch.tensor([10.0, 0.0]), 20)
    assert p[0].item() == pytest.approx(1 / (1 + c * 11.5**-0.55), abs=1e-12)
    assert p[0].item() == pytest.approx(0.537021, abs=1e-5)
    assert p[1].item() == pytest.approx(1 / (1 + c * 1.5**-0.55), abs=1e-12)
    q = propensities(torch.tensor([10.0]), 20, A=0.6, B=2.6)
    assert q.item() == pytest.approx(1 / (1 + (math.log(20) - 1) * 3.6**0.6 * 12.6**-0.6), abs=1e-12)


def test_perfect_predictions_score_one_and_no_labels_score_zero():
    m = XMCMetrics(4, torch.tensor([3.0, 2, 1, 1]), 10, ks=(1, 2))
    m.update(torch.tensor([[1, 3], [2, 0]]), torch.tensor([0, 2, 4]), torch.tensor([3, 1, 0, 2]))
    got = m.compute()
    assert all(got[k] == 1.0 for k in ("P@1", "P@2", "nDCG@1", "nDCG@2", "R@2")), got
    assert got["R@1"] == pytest.approx(0.5)
    # Predicted in the wrong order for the PS ranking (w1 < w3), so PSnDCG@1 < 1 but PSP@2 = 1.
    assert got["PSP@2"] == pytest.approx(1.0) and got["PSnDCG@1"] < 1
    empty = XMCMetrics(4, torch.ones(4), 10, ks=(1,))
    empty.update(torch.tensor([[0]]), torch.tensor([0, 0]), torch.tensor([], dtype=torch.long))
    assert set(empty.compute().values()) == {0.0}


def test_popularity_baseline():
    batches = [SimpleNamespace(label_indptr=INDPTR, label_indices=INDICES, valid=VALID)]
    base = popularity_baseline(XMCMetrics(6, FREQ, NUM_TRAIN, ks=(1, 3)), batches)
    # Most frequent first: 0, 1, 4 (frequencies 10, 5, 3).
    assert base["P@1"] == pytest.approx(2 / 4)  # s0 and s3 hold label 0
    assert base["P@3"] == pytest.approx((1 + 1 + 0 + 2) / 3 / 4)
    assert base["R@3"] == pytest.approx((1 / 2 + 1 + 0 + 2 / 4) / 4)


def _distributed_metrics(rank: int, world: int, num_labels: int, rows: int) -> dict:
    grid = build_grid(2)
    logits, indptr, indices, valid = _test_set(num_labels, rows)
    lr = split_labels(num_labels, grid.mp, grid.mp_rank)
    freq = torch.arange(num_labels, dtype=torch.float64) % 7
    metrics = XMCMetrics(num_labels, freq, 100)
    per_group = rows // grid.dp
    for a in range(grid.dp_rank * per_group, (grid.dp_rank + 1) * per_group, 4):  # batches of 4
        _, ids = distributed_topk(logits[a : a + 4, lr.start : lr.stop], 5, lr, grid.mp_group)
        metrics.update(
            ids, indptr[a : a + 5] - indptr[a], indices[indptr[a] : indptr[a + 4]], valid[a : a + 4]
        )
    return {"dp": metrics.compute(grid.dp_group), "world": metrics.compute(), "local": metrics.count.item()}


def _test_set(num_labels: int, rows: int):
    g = torch.Generator().manual_seed(11)
    logits = torch.randint(0, 6, (rows, num_labels), generator=g).float()  # many ties
    counts = torch.randint(0, 4, (rows,), generator=g)
    indptr = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    indices = torch.randint(0, num_labels, (int(indptr[-1]),), generator=g)
    return logits, indptr, indices, torch.rand(rows, generator=g) > 0.1


def test_distributed_metrics_equal_single_process():
    num_labels, rows = 101, 16
    results = run_ranks(4, _distributed_metrics, num_labels, rows)
    logits, indptr, indices, valid = _test_set(num_labels, rows)
    ids = torch.tensor(
        [sorted(range(num_labels), key=lambda c, r=r: (-logits[r, c].item(), c))[:5] for r in range(rows)]
    )
    reference = XMCMetrics(num_labels, torch.arange(num_labels, dtype=torch.float64) % 7, 100)
    reference.update(ids, indptr, indices, valid)
    expected = reference.compute()
    assert sum(r["local"] for r in results[::2]) == valid.sum().item()
    for r in results:
        for key, value in expected.items():
            assert r["dp"][key] == pytest.approx(value, abs=1e-12), key
            assert r["world"][key] == pytest.approx(value, abs=1e-12), key
