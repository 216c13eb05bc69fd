"""Rewiring of the FFI layer: which connections move, where to, and what happens to their optimizer state."""

from __future__ import annotations

import pytest
import torch

from pipeline.ops import FixedFanInSparse, rewire
from pipeline.ops.rewiring import connections_to_rewire


def _trained_layer(in_features=200, out_features=150, fan_in=16, optimizer=torch.optim.Adam, seed=0, steps=3):
    """A layer after a few optimizer steps, so weights and moments are non-trivial."""
    torch.manual_seed(seed)
    layer = FixedFanInSparse(in_features, out_features, fan_in, seed=seed)
    opt = optimizer(layer.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(8, in_features)).pow(2).mean().backward()
        opt.step()
    return layer, opt


def _snapshot(layer, opt):
    state = {k: v.clone() for k, v in opt.state[layer.values].items()}
    return layer.values.detach().clone(), layer.indices.clone(), layer.bias.detach().clone(), state


def _expected_positions(values, count):
    return values.abs().argsort(dim=1, stable=True)[:, :count]


def _distinct_rows(indices):
    ordered = indices.long().sort(dim=1).values
    return bool((ordered[:, 1:] != ordered[:, :-1]).all())


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW])
@pytest.mark.parametrize("fraction,init_value", [(0.1, 0.0), (0.25, 0.001), (0.75, 0.0)])
def test_rewire_moves_exactly_the_weakest_connections(optimizer, fraction, init_value):
    layer, opt = _trained_layer(optimizer=optimizer)
    values, indices, bias, state = _snapshot(layer, opt)
    count = connections_to_rewire(16, fraction)
    moved = rewire(layer, fraction, torch.Generator().manual_seed(1), opt, init_value=init_value)
    assert moved == 150 * count and count == round(fraction * 16)

    hit = torch.zeros_like(values, dtype=torch.bool).scatter_(1, _expected_positions(values, count), True)
    new_values, new_indices = layer.values.detach(), layer.indices
    assert new_indices.shape == (150, 16) and new_indices.dtype == torch.int32
    assert _distinct_rows(new_indices)
    assert int(new_indices.min()) >= 0 and int(new_indices.max()) < 200
    # Rewired entries: weight restarted, both Adam moments zeroed, index replaced by one the row lacked.
    assert bool((new_values[hit] == init_value).all())
    after = opt.state[layer.values]
    for name in ("exp_avg", "exp_avg_sq"):
        assert bool((state[name][hit] != 0).all()), "the test needs non-zero moments before rewiring"
        assert bool((after[name][hit] == 0).all())
        assert torch.equal(after[name][~hit], state[name][~hit])
    fresh = new_indices.long().masked_fill(~hit, -1)
    assert not bool((fresh[:, :, None] == indices.long()[:, None, :]).any()), "a new index was already there"
    # Everything else untouched.
    assert torch.equal(new_values[~hit], values[~hit])
    assert torch.equal(new_indices[~hit], indices[~hit])
    assert torch.equal(layer.bias.detach(), bias)
    assert torch.equal(after["step"], state["step"])


def test_rewire_is_deterministic_for_a_seed():
    results = []
    for seed in (5, 5, 6):
        layer, opt = _trained_layer(seed=0)
        rewire(layer, 0.2, torch.Generator().manual_seed(seed), opt)
        results.append(layer.indices.clone())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[0], results[2])


def test_rewire_without_room_keeps_a_permutation():
    """fan_in = in_features: the only free inputs are the dropped ones, so each row stays a permutation."""
    layer, opt = _trained_layer(in_features=12, out_features=30, fan_in=12)
    assert rewire(layer, 0.5, torch.Generator().manual_seed(0), opt) == 30 * 6
    assert torch.equal(layer.indices.long().sort(dim=1).values, torch.arange(12).expand(30, 12))


def test_rewire_with_little_room_stays_distinct():
    layer, opt = _trained_layer(in_features=20, out_features=64, fan_in=16)
    values, indices, _, _ = _snapshot(layer, opt)
    rewire(layer, 0.5, torch.Generator().manual_seed(0), opt)
    assert _distinct_rows(layer.indices)
    hit = torch.zeros_like(values, dtype=torch.bool).scatter_(1, _expected_positions(values, 8), True)
    assert torch.equal(layer.indices[~hit], indices[~hit])


def test_rewire_chunks_over_many_rows():
    """More rows than one chunk (2**20 connections): every chunk rewired, rows stay distinct."""
    layer = FixedFanInSparse(4096, 40_000, 32, seed=2)
    with torch.no_grad():
        layer.values.copy_(torch.arange(32.0).flip(0).expand(40_000, 32))  # weakest: the last 3 positions
    before = layer.indices.clone()
    assert rewire(layer, 0.1, torch.Generator().manual_seed(0)) == 40_000 * 3
    assert torch.equal(layer.indices[:, :29], before[:, :29])
    assert bool((layer.indices[:, 29:] != before[:, 29:]).all())
    assert _distinct_rows(layer.indices)
    assert bool((layer.values[:, 29:] == 0).all())


def test_rewire_zeroes_sgd_momentum_too():
    layer, opt = _trained_layer(optimizer=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    values, _, _, state = _snapshot(layer, opt)
    rewire(layer, 0.25, torch.Generator().manual_seed(0), opt)
    hit = torch.zeros_like(values, dtype=torch.bool).scatter_(1, _expected_positions(values, 4), True)
    buffer = opt.state[layer.values]["momentum_buffer"]
    assert bool((buffer[hit] == 0).all()) and torch.equal(buffer[~hit], state["momentum_buffer"][~hit])


def test_rewire_nothing_and_invalid_fraction():
    layer, opt = _trained_layer()
    values, indices, _, _ = _snapshot(layer, opt)
    assert rewire(layer, 0.01, torch.Generator().manual_seed(0), opt) == 0
    assert torch.equal(layer.indices, indices) and torch.equal(layer.values.detach(), values)
    with pytest.raises(ValueError, match="fraction"):
        rewire(layer, 1.5, torch.Generator())


def test_layer_trains_on_after_rewiring():
    """The rewired layer still equals its dense equivalent, forward and backward."""
    layer, opt = _trained_layer()
    rewire(layer, 0.3, torch.Generator().manual_seed(0), opt, init_value=0.01)
    opt.zero_grad(set_to_none=True)
    x = torch.randn(5, 200)
    y = layer(x)
    dense = layer.to_dense().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x, dense, layer.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(
        layer.values.grad, dense.grad.gather(1, layer.indices.long()), rtol=1e-5, atol=1e-5
    )
