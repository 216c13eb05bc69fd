"""Output biases from label priors: each loss's constant minimiser, the same for any split."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.ffi import FFIHead
from pipeline.models.heads.prior import prior_bias, set_prior_bias
from pipeline.models.heads.rp import RPHead
from pipeline.parallel.label_range import LabelRange, split_labels

FREQ = torch.tensor([0, 1, 5, 40, 99, 100, 3, 0, 17, 60, 2])
N = 100


def whole() -> LabelRange:
    return LabelRange(0, len(FREQ), len(FREQ))


@pytest.mark.parametrize("loss", ["bce", "squared_hinge"])
def test_bias_minimises_the_labels_constant_loss(loss):
    """Per label, the bias is the constant logit that minimises the mean loss over the (smoothed)
    training targets: f + 1 positives and n - f + 1 negatives."""
    b = prior_bias(FREQ, N, loss, whole()).double()
    for label, f in enumerate(FREQ.tolist()):
        pos, neg = f + 1, N - f + 1
        grid = b[label] + torch.linspace(-0.05, 0.05, 101, dtype=torch.float64)
        if loss == "bce":
            total = pos * F.softplus(-grid) + neg * F.softplus(grid)
        else:
            total = pos * (1 - grid).clamp(min=0) ** 2 + neg * (1 + grid).clamp(min=0) ** 2
        assert int(total.argmin()) == 50, (loss, label)


def test_softmax_bias_is_the_log_prior():
    b = prior_bias(FREQ, N, "softmax", whole())
    p = torch.softmax(b.double(), 0)
    expected = (FREQ.double() + 1) / (FREQ.double() + 1).sum()
    torch.testing.assert_close(p, expected, rtol=1e-6, atol=0)


def test_any_split_gives_the_same_biases():
    full = prior_bias(FREQ, N, "bce", whole())
    for mp in (2, 3, 4):
        parts = [prior_bias(FREQ, N, "bce", split_labels(len(FREQ), mp, r)) for r in range(mp)]
        assert torch.equal(torch.cat(parts), full)
    with pytest.raises(ValueError, match="unknown loss"):
        prior_bias(FREQ, N, "hinge", whole())


@pytest.mark.parametrize(
    "make",
    [
        lambda lr: DenseHead(8, lr, seed=1),
        lambda lr: RPHead(8, lr, 4, seed=1),
        lambda lr: FFIHead(8, lr, hidden=16, fan_in=4, seed=1),
    ],
    ids=["dense", "rp", "ffi"],
)
def test_every_head_takes_the_priors_of_its_range(make):
    lr = split_labels(len(FREQ), 2, 1)
    head = make(lr)
    set_prior_bias(head, FREQ, N, "bce")
    assert torch.equal(head.output_bias().detach(), prior_bias(FREQ, N, "bce", lr))
    logits = head(torch.zeros(3, 8))
    if not isinstance(head, FFIHead):  # zero embeddings: the logits are the biases
        torch.testing.assert_close(logits, head.output_bias().detach().expand(3, -1))
