"""Build the backbone and this rank's shard of the output layer from the run config."""

from __future__ import annotations

from torch import nn

from pipeline.config import ModelConfig
from pipeline.data.tokenizer import TextTokenizer
from pipeline.models.backbones import BowBackbone, DenseBackbone
from pipeline.models.heads.base import Head
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.ffi import FFIHead
from pipeline.models.heads.rp import RPHead
from pipeline.models.text_encoder import TransformerBackbone
from pipeline.parallel.label_range import LabelRange

BACKBONE_DATA = {"bow": "bow", "dense": "dense", "transformer": "text"}
"""`model.backbone` -> the feature kind of the shards it reads (`Manifest.feature_kind`)."""


def build_backbone(model: ModelConfig, feature_kind: str, num_features: int) -> nn.Module:
    """`num_features` is the vocabulary size for bag-of-words data, the input width for dense data
    (unused for text: the tokenizer's vocabulary sizes the encoder)."""
    want = BACKBONE_DATA[model.backbone]
    if feature_kind != want:
        raise ValueError(
            f"model.backbone={model.backbone!r} reads {want} shards, the manifest says {feature_kind!r}"
        )
    if model.backbone == "transformer":
        return TransformerBackbone.from_config(model.encoder, model.embed_dim)
    if model.backbone == "bow":
        return BowBackbone(num_features, model.embed_dim, model.hidden_dims, model.dropout)
    return DenseBackbone(num_features, model.embed_dim, model.hidden_dims)


def build_tokenizer(model: ModelConfig) -> TextTokenizer | None:
    """The tokenizer the loader workers run on text shards (the encoder's own, from its folder), or
    None for backbones that read features."""
    if model.encoder is None or model.backbone != "transformer":
        return None
    return TextTokenizer(model.encoder.path, model.encoder.max_length)  # it resolves pkg: itself


HEADS: dict[str, type] = {"dense": DenseHead, "ffi": FFIHead, "rp": RPHead}
"""`model.head` -> the class; each builds itself with `from_config(model, label_range, seed)`."""


def build_head(model: ModelConfig, label_range: LabelRange, seed: int) -> Head:
    """The output layer for the labels [label_range.start, label_range.stop) of this model-parallel rank."""
    return HEADS[model.head].from_config(model, label_range, seed)


def sharded_state_keys(head: nn.Module, local_labels: int) -> set[str]:
    """State-dict keys split by label range: the tensors with one row per local label that belong to a
    submodule whose parameters are all sharded (e.g. the FFI layer's values, bias and connection
    indices). The rest is replicated across the model-parallel group."""
    sharded = {id(p) for p in head.sharded_parameters()}
    keys: set[str] = set()
    for prefix, module in head.named_modules():
        own = list(module.parameters(recurse=False))
        if own and all(id(p) in sharded for p in own):
            for name, tensor in module.state_dict(keep_vars=True).items():
                if "." not in name and tensor.dim() and tensor.shape[0] == local_labels:
                    keys.add(f"{prefix}.{name}" if prefix else name)
    return keys
