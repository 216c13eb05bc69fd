"""The group-shared FFI operators, module and rewiring against the dense reference (tests/reference.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.ops import FixedFanInSparse, draw_fan_in_indices, ffi_sparse, load_ops, rewire
from pipeline.ops.ffi_sparse import INIT_STREAM
from pipeline.parallel.block_init import block_rows, uniform
from pipeline.parallel.label_range import LabelRange
from tests.reference import ffi_group_to_dense

# (batch N, in_features H, out_features C, fan_in K, group_size G): batches 1, 7, 33 and over the
# kernels' 512-row chunks; C not a multiple of G; G = 1, 3, 16, G > C; K = 1 and K = H; float32 slices
# of 8 and 16 lanes, partial slices, groups of several slices, and layers of whole groups only (the
# float32 kernels' in-place and streamed paths, aligned rows of y).
SHAPES = [
    (1, 5, 3, 1, 1),
    (7, 9, 13, 9, 3),
    (33, 64, 101, 8, 16),
    (7, 64, 37, 5, 40),
    (1, 30, 50, 30, 16),
    (33, 1, 5, 1, 2),
    (600, 24, 37, 5, 4),
    (33, 200, 300, 12, 9),
    (40, 100, 530, 20, 32),
    (7, 48, 100, 48, 1),
    (70, 96, 512, 16, 16),
    (520, 40, 272, 6, 16),
    (33, 64, 200, 8, 8),
]


@pytest.fixture(scope="module", autouse=True)
def _ops():
    load_ops()


@pytest.fixture
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


def _problem(n, h, c, k, g, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    values = torch.randn(c, k, generator=gen, dtype=torch.float64).to(dtype)
    indices = draw_fan_in_indices(-(-c // g), h, k, gen).to(torch.int32)
    bias = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(n, c, generator=gen, dtype=torch.float64).to(dtype)
    return x, values, indices, bias, dy


def _reference(x, values, indices, bias, dy, group_size):
    """y, dx, dW, db in float64 through autograd over the dense weight of the reference."""
    x, values, bias = (t.detach().to(torch.float64, copy=True).requires_grad_() for t in (x, values, bias))
    dense = ffi_group_to_dense(values, indices, group_size, x.shape[1])
    y = x @ dense.t() + bias
    y.backward(dy.double())
    return y.detach(), x.grad, values.grad, bias.grad


def _close(actual, expected, rel):
    """Relative to the tensor's scale: entries near zero carry the rounding error of their terms."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * max(scale, 1e-30))


def _check_ops(shape, dtype, rel):
    n, h, c, k, g = shape
    x, values, indices, bias, dy = _problem(*shape, dtype=dtype)
    y_ref, dx_ref, dw_ref, _ = _reference(x, values, indices, bias, dy, g)
    y = torch.ops.xmc.ffi_group_forward(x, values, indices, bias, g)
    dx, dw = torch.ops.xmc.ffi_group_backward(dy, x, values, indices, g, True, True)
    assert y.shape == (n, c) and dx.shape == (n, h) and dw.shape == (c, k)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        _close(actual, expected, rel)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ops_match_dense_float64(shape, threads):
    _check_ops(shape, torch.float64, 1e-12)


@pytest.mark.parametrize("threads", [2], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ops_float32_and_bfloat16(shape, threads):
    _check_ops(shape, torch.float32, 1e-5)
    # Inputs are exact bf16 values and sums accumulate in float32: only the output rounding remains.
    _check_ops(shape, torch.bfloat16, 1e-2)


def test_group_of_one_equals_the_plain_ops():
    x, values, indices, bias, dy = _problem(9, 40, 23, 6, 1, dtype=torch.float32)
    y = torch.ops.xmc.ffi_group_forward(x, values, indices, bias, 1)
    _close(y, torch.ops.xmc.ffi_forward(x, values, indices, bias).double(), 1e-6)
    dx, dw = torch.ops.xmc.ffi_group_backward(dy, x, values, indices, 1, True, True)
    dx_plain, dw_plain = torch.ops.xmc.ffi_backward(dy, x, values, indices, True, True)
    _close(dx, dx_plain.double(), 1e-6)
    _close(dw, dw_plain.double(), 1e-6)


@pytest.mark.parametrize("need_input,need_weight", [(True, False), (False, True), (False, False)])
def test_only_requested_gradients_are_computed(need_input, need_weight):
    x, values, indices, bias, dy = _problem(7, 30, 20, 4, 3)
    _, dx_ref, dw_ref, _ = _reference(x, values, indices, bias, dy, 3)
    dx, dw = torch.ops.xmc.ffi_group_backward(dy, x, values, indices, 3, need_input, need_weight)
    assert (dx is None) != need_input and (dw is None) != need_weight, "a gradient not asked for is None"
    if need_input:
        _close(dx, dx_ref, 1e-12)
    if need_weight:
        _close(dw, dw_ref, 1e-12)


def test_autograd_matches_dense_and_calls_backward_once(monkeypatch):
    x, values, indices, bias, dy = _problem(6, 25, 19, 5, 4)
    y_ref, dx_ref, dw_ref, db_ref = _reference(x, values, indices, bias, dy, 4)
    calls = []
    real = torch.ops.xmc.ffi_group_backward

    def recording(*args):
        calls.append(args[-3:])
        return real(*args)

    monkeypatch.setattr(torch.ops.xmc, "ffi_group_backward", recording)
    xs, vs, bs = (t.clone().requires_grad_() for t in (x, values, bias))
    y = ffi_sparse(xs, vs, indices, bs, 4)
    y.backward(dy)
    _close(y.detach(), y_ref, 1e-12)
    _close(xs.grad, dx_ref, 1e-12)
    _close(vs.grad, dw_ref, 1e-12)
    _close(bs.grad, db_ref, 1e-12)
    ffi_sparse(xs, vs.detach(), indices, None, 4).sum().backward()  # x only
    ffi_sparse(x, values, indices, bs, 4).sum().backward()  # bias only: no kernel call
    assert calls == [(4, True, True), (4, True, False)]


def test_gradcheck_float64():
    x, values, indices, bias, _ = _problem(4, 7, 5, 3, 2)
    for t in (x, values, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, w, b: ffi_sparse(a, w, indices, b, 2), (x, values, bias))


def test_degenerate_shapes():
    x, values, indices, bias, _ = _problem(0, 8, 5, 2, 2)
    assert torch.ops.xmc.ffi_group_forward(x, values, indices, bias, 2).shape == (0, 5)
    dx, dw = torch.ops.xmc.ffi_group_backward(
        torch.zeros(0, 5, dtype=x.dtype), x, values, indices, 2, True, True
    )
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(5, 2, dtype=x.dtype))
    x = torch.randn(3, 8)
    none = torch.zeros(0, 2, dtype=torch.int32)
    dx, dw = torch.ops.xmc.ffi_group_backward(torch.zeros(3, 0), x, torch.zeros(0, 2), none, 4, True, True)
    assert torch.equal(dx, torch.zeros(3, 8)) and dw.shape == (0, 2)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda a: {**a, "indices": a["indices"][:4]},
            "indices has 4 rows but 13 outputs in groups of 3 make 5",
        ),
        (lambda a: {**a, "group_size": 0}, "group_size must be >= 1, got 0"),
        (lambda a: {**a, "indices": a["indices"].long()}, "indices must be int32"),
        (lambda a: {**a, "indices": a["indices"][:, :2]}, "must have the same number of columns"),
        (lambda a: {**a, "values": a["values"].double()}, "values must have the dtype of x"),
        (lambda a: {**a, "bias": torch.zeros(12)}, r"bias must have shape \[13\]"),
        (lambda a: {**a, "x": a["x"][:, :2]}, "fan_in 3 exceeds in_features 2"),
        (
            lambda a: {**a, "x": a["x"].half(), "values": a["values"].half(), "bias": None},
            "float32, bfloat16 or float64",
        ),
    ],
)
def test_forward_argument_errors(change, message):
    gen = torch.Generator().manual_seed(0)
    args = {
        "x": torch.randn(4, 8, generator=gen),
        "values": torch.randn(13, 3, generator=gen),
        "indices": draw_fan_in_indices(5, 8, 3, gen).int(),
        "bias": torch.zeros(13),
        "group_size": 3,
    }
    a = change(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.xmc.ffi_group_forward(a["x"], a["values"], a["indices"], a["bias"], a["group_size"])


def test_backward_argument_errors():
    values, indices = torch.randn(5, 3), torch.tensor([[0, 1, 2]] * 3, dtype=torch.int32)
    dy, x = torch.randn(2, 5), torch.randn(2, 8)
    backward = torch.ops.xmc.ffi_group_backward
    backward(dy, x, values, indices, 2, True, True)  # valid
    with pytest.raises(RuntimeError, match="grad_y has 4 columns but the layer has 5 outputs"):
        backward(torch.randn(2, 4), x, values, indices, 2, True, True)
    with pytest.raises(RuntimeError, match="grad_y has 2 rows but x has 3"):
        backward(dy, torch.randn(3, 8), values, indices, 2, False, True)
    with pytest.raises(RuntimeError, match="indices has 3 rows but 5 outputs in groups of 1 make 5 groups"):
        backward(dy, x, values, indices, 1, True, True)
    with pytest.raises(RuntimeError, match="group_size must be >= 1, got 0"):
        backward(dy, x, values, indices, 0, True, True)
    with pytest.raises(RuntimeError, match="values must have the dtype of grad_y"):
        backward(dy, x, values.double(), indices, 2, True, False)
    with pytest.raises(RuntimeError, match="grad_y must have the dtype of x"):
        backward(dy.bfloat16(), x, values, indices, 2, True, False)
    one_bad = indices.clone()
    one_bad[2, 1] = 8
    with pytest.raises(RuntimeError, match=r"1 entries outside \[0, in_features=8\)"):
        backward(dy, x, values, one_bad, 2, True, True)


# ---------------------------------------------------------------- the module


def test_module_matches_dense_and_holds_groups():
    layer = FixedFanInSparse(50, 23, 6, seed=3, group_size=5)
    assert layer.group_size == 5 and layer.groups == 5
    assert layer.indices.shape == (5, 6) and layer.indices.dtype == torch.int32
    assert layer.values.shape == (23, 6) and set(layer.state_dict()) == {"values", "indices", "bias"}
    ordered = layer.indices.long().sort(dim=1).values
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all()), "indices repeat within a group"
    assert "group_size=5" in repr(layer)
    dense = layer.to_dense()
    expected = ffi_group_to_dense(layer.values.detach(), layer.indices, 5, 50)
    assert torch.equal(dense, expected)
    x = torch.randn(2, 3, 50, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 3, 23)
    y_ref = torch.nn.functional.linear(x, dense, layer.bias.detach())
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.backward(torch.ones_like(y))
    assert layer.values.grad.shape == (23, 6) and layer.bias.grad.shape == (23,)


def _plain_initial_rows(rows, in_features, fan_in, seed, first_row):
    """The seeded initialisation of the plain layer, written out: group_size 1 must keep it exactly."""
    bound = 1.0 / math.sqrt(fan_in)

    def draw(gen, n):
        indices = draw_fan_in_indices(n, in_features, fan_in, gen)
        return indices, uniform(gen, (n, fan_in), bound), uniform(gen, (n,), bound)

    return block_rows(LabelRange(first_row, first_row + rows, first_row + rows), seed, INIT_STREAM, draw)


def test_group_of_one_initialises_as_the_plain_layer():
    layer = FixedFanInSparse(40, 5000, 6, seed=9, group_size=1, first_row=4000)
    indices, values, bias = _plain_initial_rows(5000, 40, 6, 9, 4000)
    assert torch.equal(layer.indices, indices.int())
    assert torch.equal(layer.values.detach(), values) and torch.equal(layer.bias.detach(), bias)
    assert layer.groups == 5000 and layer.indices.shape == (5000, 6)


def test_seeded_shards_at_group_boundaries_equal_the_whole_layer():
    size, labels = 16, 70_003  # 4376 groups (the last holds 3 labels): two blocks of group rows
    whole = FixedFanInSparse(40, labels, 4, seed=9, group_size=size)
    assert whole.indices.shape == (4376, 4)
    for first, rows in ((0, 16), (4080, 48), (65_520, 32), (65_536, 1000), (70_000, 3), (32, 0)):
        part = FixedFanInSparse(40, rows, 4, seed=9, group_size=size, first_row=first)
        q0 = first // size
        assert torch.equal(part.indices, whole.indices[q0 : q0 + part.groups])
        assert torch.equal(part.values, whole.values[first : first + rows])
        assert torch.equal(part.bias, whole.bias[first : first + rows])
    other = FixedFanInSparse(40, 64, 4, seed=10, group_size=size)
    assert not torch.equal(other.indices, whole.indices[:4])


def test_first_row_must_start_a_group():
    with pytest.raises(ValueError, match="first_row 24 is not a multiple of group_size 16"):
        FixedFanInSparse(40, 32, 4, seed=1, group_size=16, first_row=24)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        FixedFanInSparse(40, 32, 4, group_size=0)


# ---------------------------------------------------------------- rewiring


def _trained_group_layer(in_features=200, out_features=150, fan_in=16, group_size=16, steps=3):
    torch.manual_seed(0)
    layer = FixedFanInSparse(in_features, out_features, fan_in, seed=0, group_size=group_size)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(8, in_features)).pow(2).mean().backward()
        opt.step()
    return layer, opt


def _group_hits(values, group_size, count):
    """[C, K] mask of the `count` positions per group of smallest summed |W| (ties to the lower one)."""
    hit = torch.zeros_like(values, dtype=torch.bool)
    for q0 in range(0, values.shape[0], group_size):
        strength = values[q0 : q0 + group_size].double().abs().sum(0)
        weakest = strength.argsort(stable=True)[:count]
        hit[q0 : q0 + group_size, weakest] = True
    return hit


@pytest.mark.parametrize(
    "in_features,fraction,init_value", [(200, 0.25, 0.0), (200, 0.1, 0.001), (20, 0.5, 0.0)]
)
def test_group_rewire_moves_exactly_the_weakest_positions(in_features, fraction, init_value):
    layer, opt = _trained_group_layer(in_features=in_features)
    values, indices = layer.values.detach().clone(), layer.indices.clone()
    bias = layer.bias.detach().clone()
    state = {k: v.clone() for k, v in opt.state[layer.values].items()}
    count = round(fraction * 16)
    moved = rewire(layer, fraction, torch.Generator().manual_seed(1), opt, init_value=init_value)
    assert moved == 150 * count

    hit = _group_hits(values, 16, count)
    group_hit = hit[::16]  # [groups, K]: the moved index positions
    new_values, new_indices = layer.values.detach(), layer.indices
    assert new_indices.shape == (10, 16) and new_indices.dtype == torch.int32
    ordered = new_indices.long().sort(dim=1).values
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all()), "indices repeat within a group"
    assert int(new_indices.min()) >= 0 and int(new_indices.max()) < in_features
    assert torch.equal(new_indices[~group_hit], indices[~group_hit])
    if in_features >= 16 + count:  # room to avoid every index the group held
        fresh = new_indices.long().masked_fill(~group_hit, -1)
        assert not bool((fresh[:, :, None] == indices.long()[:, None, :]).any())
    assert bool((new_values[hit] == init_value).all())
    assert torch.equal(new_values[~hit], values[~hit])
    after = opt.state[layer.values]
    for name in ("exp_avg", "exp_avg_sq"):
        assert bool((state[name][hit] != 0).all()), "the test needs non-zero moments before rewiring"
        assert bool((after[name][hit] == 0).all())
        assert torch.equal(after[name][~hit], state[name][~hit])
    assert torch.equal(layer.bias.detach(), bias) and torch.equal(after["step"], state["step"])
    # The rewired layer still equals its dense equivalent.
    x = torch.randn(5, in_features)
    torch.testing.assert_close(
        layer(x), torch.nn.functional.linear(x, layer.to_dense(), layer.bias.detach()), rtol=1e-5, atol=1e-5
    )
