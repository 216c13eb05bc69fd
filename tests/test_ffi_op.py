"""The FFI operators and module against the dense equivalent (weights scattered into a C x H matrix)."""

from __future__ import annotations

import pytest
import torch

from pipeline.ops import FixedFanInSparse, draw_fan_in_indices, ffi_sparse, load_ops
from tests.reference import ffi_dense_reference

# (batch N, in_features H, out_features C, fan_in K): K = 1, K = H, odd C, batch 1, batches that are not
# multiples of the kernels' 16-row blocks, and a batch over 512 rows (several transposed chunks).
SHAPES = [
    (1, 5, 3, 1),
    (1, 12, 7, 12),
    (7, 9, 13, 9),
    (20, 64, 101, 8),
    (33, 1, 5, 1),
    (600, 24, 37, 5),
]


def _random_shapes(count: int, seed: int) -> list[tuple[int, int, int, int]]:
    g = torch.Generator().manual_seed(seed)
    shapes = []
    for _ in range(count):
        n, h, c = (int(torch.randint(1, hi, (1,), generator=g)) for hi in (70, 300, 500))
        k = int(torch.randint(1, h + 1, (1,), generator=g))
        shapes.append((n, h, c, k))
    return shapes


ALL_SHAPES = SHAPES + _random_shapes(6, seed=11)


@pytest.fixture(scope="module", autouse=True)
def _ops():
    load_ops()


def _problem(n, h, c, k, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype)
    values = torch.randn(c, k, generator=g).to(dtype)
    indices = draw_fan_in_indices(c, h, k, g).to(torch.int32)
    bias = torch.randn(c, generator=g).to(dtype)
    dy = torch.randn(n, c, generator=g).to(dtype)
    return x, values, indices, bias, dy


def _close(actual, expected, rel):
    """Relative to the tensor's scale: entries near zero carry the rounding error of their terms."""
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=rel, atol=rel * max(scale, 1e-30))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=str)
def test_ops_match_dense_float32(shape, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, values, indices, bias, dy = _problem(*shape)
        y_ref, dx_ref, dw_ref, _ = ffi_dense_reference(x, values, indices, bias, dy)
        _close(torch.ops.xmc.ffi_forward(x, values, indices, bias), y_ref, 1e-5)
        _close(torch.ops.xmc.ffi_backward_input(dy, values, indices, shape[1]), dx_ref, 1e-5)
        _close(torch.ops.xmc.ffi_backward_weight(dy, x, indices), dw_ref, 1e-5)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "need_input,need_weight", [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize("shape", ALL_SHAPES, ids=str)
def test_combined_backward_matches_separate_ops_and_dense(shape, need_input, need_weight):
    x, values, indices, bias, dy = _problem(*shape)
    _, dx_ref, dw_ref, _ = ffi_dense_reference(x, values, indices, bias, dy)
    dx, dw = torch.ops.xmc.ffi_backward(dy, x, values, indices, need_input, need_weight)
    assert (dx is None) != need_input and (dw is None) != need_weight, "a gradient not asked for is None"
    if need_input:
        assert dx.shape == (shape[0], shape[1]) and dx.dtype == torch.float32
        _close(dx, dx_ref, 1e-5)
        assert torch.equal(dx, torch.ops.xmc.ffi_backward_input(dy, values, indices, shape[1]))
    if need_weight:
        assert dw.shape == (shape[2], shape[3]) and dw.dtype == torch.float32
        _close(dw, dw_ref, 1e-5)
        assert torch.equal(dw, torch.ops.xmc.ffi_backward_weight(dy, x, indices))


@pytest.mark.parametrize("shape", [(1, 5, 3, 1), (20, 64, 101, 8), (600, 24, 37, 5)], ids=str)
def test_combined_backward_bfloat16_and_float64(shape):
    for dtype, rel in ((torch.bfloat16, 1e-2), (torch.float64, 1e-12)):
        x, values, indices, bias, dy = _problem(*shape, dtype=dtype)
        _, dx_ref, dw_ref, _ = ffi_dense_reference(x, values, indices, bias, dy)
        dx, dw = torch.ops.xmc.ffi_backward(dy, x, values, indices, True, True)
        assert dx.dtype == dw.dtype == dtype
        _close(dx, dx_ref, rel)
        _close(dw, dw_ref, rel)


def test_combined_backward_degenerate_shapes_and_errors():
    x, values, indices, _, _ = _problem(0, 8, 5, 2)
    dx, dw = torch.ops.xmc.ffi_backward(torch.zeros(0, 5), x, values, indices, True, True)
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(5, 2))
    x = torch.randn(3, 8)
    no_outputs = torch.zeros(0, 2, dtype=torch.int32)
    dx, dw = torch.ops.xmc.ffi_backward(torch.zeros(3, 0), x, torch.zeros(0, 2), no_outputs, True, True)
    assert torch.equal(dx, torch.zeros(3, 8)) and dw.shape == (0, 2)
    values, indices = torch.randn(5, 3), torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="grad_y has 4 columns but the layer has 5 outputs"):
        torch.ops.xmc.ffi_backward(torch.randn(2, 4), torch.randn(2, 8), values, indices, True, True)
    with pytest.raises(RuntimeError, match="grad_y has 2 rows but x has 3"):
        torch.ops.xmc.ffi_backward(torch.randn(2, 5), torch.randn(3, 8), values, indices, True, False)
    with pytest.raises(RuntimeError, match="values must have the dtype of grad_y"):
        torch.ops.xmc.ffi_backward(
            torch.randn(2, 5), torch.randn(2, 8), values.double(), indices, False, True
        )
    with pytest.raises(RuntimeError, match="fan_in 3 exceeds in_features 2"):
        torch.ops.xmc.ffi_backward(torch.randn(2, 5), torch.randn(2, 2), values, indices, True, True)
    one_bad = indices.clone()
    one_bad[4, 2] = 8
    with pytest.raises(RuntimeError, match=r"1 entries outside \[0, in_features=8\)"):
        torch.ops.xmc.ffi_backward(torch.randn(2, 5), torch.randn(2, 8), values, one_bad, True, True)


def test_autograd_backward_is_one_combined_call(monkeypatch):
    """The layer's backward asks ffi_backward once, for exactly the gradients autograd needs."""
    calls = []
    real = torch.ops.xmc.ffi_backward

    def recording(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(torch.ops.xmc, "ffi_backward", recording)
    layer = FixedFanInSparse(20, 9, 4, seed=0)
    x = torch.randn(3, 20, requires_grad=True)
    layer(x).sum().backward()
    layer.values.requires_grad_(False)
    layer(x).sum().backward()
    layer(x.detach()).sum().backward()  # bias only: no call
    assert calls == [(True, True), (True, False)]


def test_forward_without_bias():
    x, values, indices, bias, dy = _problem(9, 30, 11, 4)
    y_ref, *_ = ffi_dense_reference(x, values, indices, torch.zeros_like(bias), dy)
    _close(torch.ops.xmc.ffi_forward(x, values, indices, None), y_ref, 1e-5)


@pytest.mark.parametrize("shape", [(1, 5, 3, 1), (20, 64, 101, 8), (600, 24, 37, 5), (3, 6, 4, 6)], ids=str)
def test_ops_bfloat16_within_bf16_tolerance(shape):
    x, values, indices, bias, dy = _problem(*shape, dtype=torch.bfloat16)
    y_ref, dx_ref, dw_ref, _ = ffi_dense_reference(x, values, indices, bias, dy)
    y = torch.ops.xmc.ffi_forward(x, values, indices, bias)
    dx = torch.ops.xmc.ffi_backward_input(dy, values, indices, shape[1])
    dw = torch.ops.xmc.ffi_backward_weight(dy, x, indices)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    # Inputs are exact bf16 values and sums accumulate in float32: only the output rounding remains.
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dw, dw_ref)):
        _close(actual, expected, 1e-2)


def test_gradcheck_float64():
    x, values, indices, bias, _ = _problem(4, 7, 5, 3, dtype=torch.float64)
    for t in (x, values, bias):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(ffi_sparse, (x, values, indices, bias))
    x2, values2, indices2, _, _ = _problem(2, 3, 4, 3, dtype=torch.float64, seed=1)
    assert torch.autograd.gradcheck(
        ffi_sparse, (x2.requires_grad_(), values2.requires_grad_(), indices2, None)
    )


def test_module_autograd_matches_dense_module():
    layer = FixedFanInSparse(50, 23, 6, seed=3)
    x = torch.randn(2, 5, 50, requires_grad=True)
    y = layer(x)
    dense = layer.to_dense().requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, dense, bias)
    assert y.shape == (2, 5, 23)
    _close(y.detach(), y_ref.detach().double(), 1e-5)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    _close(x.grad, x_ref.grad.double(), 1e-5)
    _close(layer.values.grad, dense.grad.gather(1, layer.indices.long()).double(), 1e-5)
    _close(layer.bias.grad, bias.grad.double(), 1e-5)


def test_only_requested_gradients_are_computed():
    layer = FixedFanInSparse(20, 9, 4, seed=0)
    layer.values.requires_grad_(False)
    x = torch.randn(3, 20, requires_grad=True)
    layer(x).sum().backward()
    assert layer.values.grad is None and x.grad is not None and layer.bias.grad is not None


def test_non_contiguous_inputs():
    x, values, indices, bias, dy = _problem(8, 16, 10, 4)
    y_ref, dx_ref, dw_ref, _ = ffi_dense_reference(x, values, indices, bias, dy)
    xt = x.t().contiguous().t()
    assert not xt.is_contiguous()
    _close(torch.ops.xmc.ffi_forward(xt, values, indices, bias), y_ref, 1e-5)
    dyt = dy.t().contiguous().t()
    _close(torch.ops.xmc.ffi_backward_input(dyt, values, indices, 16), dx_ref, 1e-5)
    _close(torch.ops.xmc.ffi_backward_weight(dyt, xt, indices), dw_ref, 1e-5)


def test_empty_batch_and_no_outputs():
    x, values, indices, bias, _ = _problem(0, 8, 5, 2)
    assert torch.ops.xmc.ffi_forward(x, values, indices, bias).shape == (0, 5)
    assert torch.ops.xmc.ffi_backward_input(torch.zeros(0, 5), values, indices, 8).shape == (0, 8)
    assert torch.equal(torch.ops.xmc.ffi_backward_weight(torch.zeros(0, 5), x, indices), torch.zeros(5, 2))
    layer = FixedFanInSparse(8, 0, 2)
    x = torch.randn(4, 8, requires_grad=True)
    y = layer(x)
    assert y.shape == (4, 0)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(4, 8))


def test_module_state_and_initialisation():
    layer = FixedFanInSparse(300, 257, 32, seed=7)
    assert set(layer.state_dict()) == {"values", "indices", "bias"}
    assert layer.indices.dtype == torch.int32 and layer.indices.shape == (257, 32)
    ordered = layer.indices.long().sort(dim=1).values
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all()), "indices repeat within a row"
    assert int(layer.indices.min()) >= 0 and int(layer.indices.max()) < 300
    bound, largest = 32**-0.5, float(layer.values.detach().abs().max())
    assert 0.9 * bound < largest <= bound
    assert float(layer.bias.detach().abs().max()) <= bound
    same = FixedFanInSparse(300, 257, 32, seed=7)
    other = FixedFanInSparse(300, 257, 32, seed=8)
    assert torch.equal(same.indices, layer.indices) and torch.equal(same.values, layer.values)
    assert not torch.equal(other.indices, layer.indices)
    restored = FixedFanInSparse(300, 257, 32, seed=8)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(4, 300)
    assert torch.equal(restored(x), layer(x))
    dense = layer.to_dense()
    assert dense.shape == (257, 300) and int((dense != 0).sum(dim=1).max()) == 32


def test_seeded_rows_do_not_depend_on_the_split():
    whole = FixedFanInSparse(40, 10_000, 6, seed=9)
    for first, rows in ((0, 1), (4095, 2), (4000, 5000), (9999, 1), (10_000, 0)):
        part = FixedFanInSparse(40, rows, 6, seed=9, first_row=first)
        assert torch.equal(part.indices, whole.indices[first : first + rows])
        assert torch.equal(part.values, whole.values[first : first + rows])
        assert torch.equal(part.bias, whole.bias[first : first + rows])


def test_full_fan_in_uses_every_input_once():
    layer = FixedFanInSparse(40, 33, 40, bias=False, seed=1)
    assert layer.bias is None and set(layer.state_dict()) == {"values", "indices"}
    assert torch.equal(layer.indices.long().sort(dim=1).values, torch.arange(40).expand(33, 40))


@pytest.mark.parametrize(
    "in_features,count,excluded", [(65536, 32, 0), (1000, 5, 40), (50, 10, 40), (64, 64, 0)]
)
def test_draw_fan_in_indices_distinct_and_excluding(in_features, count, excluded):
    g = torch.Generator().manual_seed(0)
    rows = 3000
    exclude = draw_fan_in_indices(rows, in_features, excluded, g) if excluded else None
    drawn = draw_fan_in_indices(rows, in_features, count, g, exclude=exclude)
    assert drawn.shape == (rows, count)
    ordered = drawn.sort(dim=1).values
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all())
    assert int(drawn.min()) >= 0 and int(drawn.max()) < in_features
    if exclude is not None:
        assert not bool((drawn[:, :, None] == exclude[:, None, :]).any())
    again = draw_fan_in_indices(rows, in_features, count, torch.Generator().manual_seed(0), exclude=None)
    if exclude is None:
        assert torch.equal(again, drawn)


def test_draw_fan_in_indices_spreads_over_inputs():
    drawn = draw_fan_in_indices(20000, 64, 8, torch.Generator().manual_seed(1))
    counts = torch.bincount(drawn.flatten(), minlength=64).double()
    expected = 20000 * 8 / 64
    assert float((counts - expected).abs().max()) < 0.05 * expected


def test_draw_fan_in_indices_rejects_impossible_requests():
    with pytest.raises(ValueError, match="cannot draw"):
        draw_fan_in_indices(3, 10, 6, exclude=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="fan_in"):
        FixedFanInSparse(8, 4, 9)


def _call_forward(x, values, indices, bias=None):
    return torch.ops.xmc.ffi_forward(x, values, indices, bias)


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "indices": a["indices"].long()}, "indices must be int32"),
        (lambda a: {**a, "values": a["values"].double()}, "values must have the dtype of x"),
        (
            lambda a: {**a, "x": a["x"].half(), "values": a["values"].half(), "bias": None},
            "float32, bfloat16 or float64",
        ),
        (lambda a: {**a, "values": a["values"][:, :2]}, "must have the same shape"),
        (lambda a: {**a, "x": a["x"][0]}, "x must be a 2-D tensor"),
        (lambda a: {**a, "bias": torch.zeros(4)}, r"bias must have shape \[5\]"),
        (lambda a: {**a, "bias": torch.zeros(5, dtype=torch.float64)}, "bias must have the dtype of x"),
        (lambda a: {**a, "indices": a["indices"].fill_(8)}, "entries outside"),
        (lambda a: {**a, "indices": a["indices"].fill_(-1)}, "entries outside"),
        (lambda a: {**a, "x": a["x"][:, :2]}, "fan_in 3 exceeds in_features 2"),
    ],
)
def test_forward_argument_errors(change, message):
    g = torch.Generator().manual_seed(0)
    args = {
        "x": torch.randn(4, 8, generator=g),
        "values": torch.randn(5, 3, generator=g),
        "indices": draw_fan_in_indices(5, 8, 3, g).int(),
        "bias": torch.zeros(5),
    }
    with pytest.raises(RuntimeError, match=message):
        _call_forward(**change(args))


def test_backward_argument_errors():
    values, indices = torch.randn(5, 3), torch.tensor([[0, 1, 2]] * 5, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="grad_y has 4 columns but the layer has 5 outputs"):
        torch.ops.xmc.ffi_backward_input(torch.randn(2, 4), values, indices, 8)
    with pytest.raises(RuntimeError, match="fan_in 3 exceeds in_features 2"):
        torch.ops.xmc.ffi_backward_input(torch.randn(2, 5), values, indices, 2)
    one_bad = indices.clone()
    one_bad[4, 2] = 3
    with pytest.raises(RuntimeError, match=r"1 entries outside \[0, in_features=3\)"):
        torch.ops.xmc.ffi_backward_input(torch.randn(2, 5), values, one_bad, 3)
    with pytest.raises(RuntimeError, match="values must have the dtype of grad_y"):
        torch.ops.xmc.ffi_backward_input(torch.randn(2, 5).double(), values, indices, 8)
    with pytest.raises(RuntimeError, match="grad_y has 2 rows but x has 3"):
        torch.ops.xmc.ffi_backward_weight(torch.randn(2, 5), torch.randn(3, 8), indices)
    with pytest.raises(RuntimeError, match="grad_y must have the dtype of x"):
        torch.ops.xmc.ffi_backward_weight(torch.randn(2, 5).bfloat16(), torch.randn(2, 8), indices)
    with pytest.raises(RuntimeError, match="grad_y has 5 columns but the layer has 4 outputs"):
        torch.ops.xmc.ffi_backward_weight(torch.randn(2, 5), torch.randn(2, 8), indices[:4])
    with pytest.raises(RuntimeError, match="indices must be int32"):
        torch.ops.xmc.ffi_backward_weight(torch.randn(2, 5), torch.randn(2, 8), indices.long())


def test_module_rejects_wrong_feature_count():
    with pytest.raises(ValueError, match="expected inputs with 10 features"):
        FixedFanInSparse(10, 3, 2)(torch.randn(2, 9))


def test_missing_compiler_is_a_clear_error(monkeypatch):
    from pipeline.ops import build

    monkeypatch.setenv("CXX", "no-such-compiler-xmc")
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler 'no-such-compiler-xmc' not found"):
        build._check_toolchain()
    monkeypatch.setenv("CXX", "c++")
    build._check_toolchain()  # the real toolchain passes


def test_devices_without_a_kernel_are_refused():
    """A device the extension has no kernel for is an error from the dispatcher, never a slow fallback."""
    meta = {"device": "meta"}
    args = (
        torch.empty(2, 4, **meta),
        torch.empty(3, 2, **meta),
        torch.empty(3, 2, dtype=torch.int32, **meta),
    )
    with pytest.raises(NotImplementedError, match="xmc::ffi_forward"):
        torch.ops.xmc.ffi_forward(*args, None)
