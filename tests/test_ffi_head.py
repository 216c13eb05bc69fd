"""The FFI head: dropout -> dense ReLU layer -> fixed fan-in layer over this rank's label range."""

from __future__ import annotations

import torch

from pipeline.config import ModelConfig
from pipeline.models.build import build_head, sharded_state_keys
from pipeline.models.heads.ffi import FFIHead
from pipeline.parallel.label_range import split_labels


def _heads(num_labels=1001, mp=3, seed=4, **kw):
    return [FFIHead(24, split_labels(num_labels, mp, r), 64, 8, seed=seed, **kw) for r in range(mp)]


def test_logits_equal_the_dense_computation():
    head = FFIHead(24, split_labels(1001, 3, 1), 64, 8, dropout=0.5, seed=4).eval()
    x = torch.randn(6, 24)
    logits = head(x)
    assert logits.shape == (6, 334)
    hidden = torch.relu(x @ head.intermediate.weight.t() + head.intermediate.bias)
    expected = hidden @ head.sparse.to_dense().t() + head.sparse.bias
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_dropout_acts_in_training_only():
    head = FFIHead(24, split_labels(50, 1, 0), 32, 4, dropout=0.5, seed=0)
    x = torch.randn(16, 24)
    assert not torch.equal(head.train()(x), head.eval()(x))
    assert torch.equal(head.eval()(x), head.eval()(x))


def test_replicated_and_sharded_parameters():
    heads = _heads()
    for head in heads:
        replicated = {id(p) for p in head.replicated_parameters()}
        sharded = {id(p) for p in head.sharded_parameters()}
        assert replicated == {id(head.intermediate.weight), id(head.intermediate.bias)}
        assert sharded == {id(head.sparse.values), id(head.sparse.bias)}
        assert replicated | sharded == {id(p) for p in head.parameters()}
        assert sharded_state_keys(head, head.label_range.size) == {
            "sparse.values": 1,
            "sparse.indices": 1,
            "sparse.bias": 1,
        }
    # The replicated layer starts equal on every rank; the connections differ between ranks.
    for other in heads[1:]:
        assert torch.equal(other.intermediate.weight, heads[0].intermediate.weight)
        assert torch.equal(other.intermediate.bias, heads[0].intermediate.bias)
    assert not torch.equal(heads[0].sparse.indices[:300], heads[1].sparse.indices[:300])


def test_initialisation_is_reproducible_per_seed_and_range():
    a, b, c = _heads(seed=4), _heads(seed=4), _heads(seed=5)
    for x, y in zip(a, b, strict=True):
        for key, value in x.state_dict().items():
            assert torch.equal(value, y.state_dict()[key]), key
    assert not torch.equal(a[0].sparse.indices, c[0].sparse.indices)
    assert not torch.equal(a[0].intermediate.weight, c[0].intermediate.weight)


def test_any_split_starts_from_the_single_process_classifier():
    whole = _heads(num_labels=9000, mp=1)[0].eval()
    shards = [h.eval() for h in _heads(num_labels=9000, mp=4)]
    for key in ("sparse.indices", "sparse.values", "sparse.bias"):
        joined = torch.cat([h.state_dict()[key] for h in shards])
        assert torch.equal(joined, whole.state_dict()[key]), key
    x = torch.randn(3, 24)
    torch.testing.assert_close(torch.cat([h(x) for h in shards], dim=1), whole(x), rtol=0, atol=0)


def test_backward_reaches_every_parameter_and_the_embeddings():
    head = _heads()[2]
    x = torch.randn(5, 24, requires_grad=True)
    head(x).pow(2).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    for name, p in head.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_rewire_moves_connections_of_the_sparse_layer():
    head = _heads()[0]
    opt = torch.optim.Adam(head.parameters())
    head(torch.randn(4, 24)).sum().backward()
    opt.step()
    before = head.sparse.indices.clone()
    weight = head.intermediate.weight.detach().clone()
    assert head.rewire(0.25, torch.Generator().manual_seed(0), opt) == 334 * 2
    assert int((head.sparse.indices != before).sum()) == 334 * 2
    assert torch.equal(head.intermediate.weight, weight)


def test_empty_label_range():
    head = FFIHead(24, split_labels(2, 3, 2), 16, 4, seed=0)
    assert head.label_range.size == 0
    x = torch.randn(3, 24, requires_grad=True)
    logits = head(x)
    assert logits.shape == (3, 0)
    logits.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 24))


def test_built_from_the_config():
    config = ModelConfig(head="ffi", embed_dim=24, ffi={"hidden": 48, "fan_in": 6, "dropout": 0.2})
    head = build_head(config, split_labels(100, 2, 1), seed=3)
    assert isinstance(head, FFIHead)
    assert head.intermediate.out_features == 48 and head.sparse.fan_in == 6 and head.dropout.p == 0.2
    assert head(torch.randn(2, 24)).shape == (2, 50)
