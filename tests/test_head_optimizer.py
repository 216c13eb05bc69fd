"""The head's optimizer: stochastic rounding into bf16, Adam/SGD against torch's, row updates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig, TrainConfig
from pipeline.train.head_optimizer import HeadOptimizer, build_head_optimizer, stochastic_round_to_bf16


def bf16_neighbours(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bf16 values just below and above each float32 x (truncation of the bit pattern, and the next)."""
    bits = x.float().view(torch.int32) & ~0xFFFF
    low = bits.view(torch.float32)
    high = (bits + 0x10000).view(torch.float32)
    return torch.minimum(low, high), torch.maximum(low, high)


def test_stochastic_rounding_is_unbiased_and_picks_a_neighbour():
    gen = torch.Generator().manual_seed(0)
    x = torch.tensor([0.1, -0.3, 1.0 + 2**-10, -(2.0**-20) * 3, 123.456])
    draws = torch.stack([stochastic_round_to_bf16(x, gen).float() for _ in range(4000)])
    low, high = bf16_neighbours(x)
    assert bool(((draws == low) | (draws == high)).all())
    spacing = high - low
    # mean of 4000 Bernoulli draws: standard error <= spacing / (2 sqrt(4000)) ~ 0.008 spacing
    assert bool(((draws.mean(0) - x).abs() <= 0.04 * spacing).all())


def test_stochastic_rounding_keeps_bf16_values_and_specials():
    x = torch.tensor([0.0, -0.0, 1.0, -2.5, 0.15625, float("inf"), float("-inf")])
    out = stochastic_round_to_bf16(x, torch.Generator().manual_seed(1))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out.float(), x)
    assert stochastic_round_to_bf16(torch.tensor([float("nan")])).float().isnan().all()


def params(seed: int, dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(7, 5, generator=gen).to(dtype)),
        nn.Parameter(torch.randn(7, generator=gen).to(dtype)),
    ]


def grads(step: int, like: list[nn.Parameter]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen) for p in like]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adam_equals_torch_adam(weight_decay):
    ours, theirs = params(0), params(0)
    opt = HeadOptimizer(ours, lr=0.01, weight_decay=weight_decay)
    ref = torch.optim.Adam(theirs, lr=0.01, weight_decay=weight_decay)
    for step in range(5):
        for p, q, g in zip(ours, theirs, grads(step, ours), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert set(opt.state[ours[0]]) == set(ref.state[theirs[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert float(opt.state[ours[0]]["step"]) == 5


def test_sgd_equals_torch_sgd_and_keeps_no_moments():
    ours, theirs = params(2), params(2)
    opt = HeadOptimizer(ours, lr=0.1, kind="sgd")
    ref = torch.optim.SGD(theirs, lr=0.1)
    for step in range(3):
        for p, q, g in zip(ours, theirs, grads(step, ours), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert set(opt.state[ours[0]]) == {"step"}


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_row_updates_by_chunk_equal_one_full_step(kind):
    whole, rows = params(3), params(3)
    opt_whole = HeadOptimizer(whole, lr=0.05, kind=kind)
    opt_rows = HeadOptimizer(rows, lr=0.05, kind=kind)
    for step in range(3):
        gs = grads(step, whole)
        for p, g in zip(whole, gs, strict=True):
            p.grad = g.clone()
        opt_whole.step()
        for lo, hi in ((0, 3), (3, 4), (4, 7)):  # chunks of labels, as the chunked loss hands them over
            for p, g in zip(rows, gs, strict=True):
                opt_rows.step_rows(p, lo, hi, g[lo:hi])
        opt_rows.step()  # no gradients left: only the step counters advance
    for p, q in zip(whole, rows, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt_whole.state[p]["step"], opt_rows.state[q]["step"])


def test_bf16_weights_keep_small_updates_in_expectation():
    """1000 SGD steps of 1e-5 on weights near 1 (bf16 spacing 2^-8 just below 1): round-to-nearest would
    never move them; stochastic rounding moves them by 0.01 on average."""
    w = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
    opt = HeadOptimizer([w], lr=1e-5, kind="sgd", generator=torch.Generator().manual_seed(0))
    for _ in range(1000):
        w.grad = torch.ones(4096, dtype=torch.bfloat16)
        opt.step()
    assert w.dtype == torch.bfloat16
    drift = 1.0 - w.float().mean().item()
    assert abs(drift - 0.01) < 0.001, drift
    assert (torch.ones(1, dtype=torch.bfloat16) - 1e-5).item() == 1.0  # what round-to-nearest gives


def test_bf16_adam_keeps_float32_moments():
    w = params(4, torch.bfloat16)
    opt = HeadOptimizer(w, lr=0.01)
    for p, g in zip(w, grads(0, w), strict=True):
        p.grad = g.to(torch.bfloat16)
    opt.step()
    assert w[0].dtype == torch.bfloat16
    assert opt.state[w[0]]["exp_avg"].dtype == torch.float32


def test_unknown_kind_and_closure_are_refused():
    with pytest.raises(ValueError, match="unknown head optimizer 'lamb'"):
        HeadOptimizer(params(0), lr=0.1, kind="lamb")
    with pytest.raises(ValueError, match="no closure"):
        HeadOptimizer(params(0), lr=0.1).step(lambda: 0.0)


def test_the_run_picks_fused_adam_unless_it_needs_this_one():
    head = nn.Linear(3, 4)
    head.weight_decay = lambda: 0.0
    gen = torch.Generator()
    plain = build_head_optimizer(head, ModelConfig(), TrainConfig(), gen)
    assert type(plain) is torch.optim.Adam and plain.defaults["fused"]
    for model, train in (
        (ModelConfig(head_dtype="bfloat16"), TrainConfig()),
        (ModelConfig(loss_chunk=2, head_update="chunk"), TrainConfig()),
        (ModelConfig(), TrainConfig(head_optimizer="sgd")),
    ):
        assert isinstance(build_head_optimizer(head, model, train, gen), HeadOptimizer)
