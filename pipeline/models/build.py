"""Build the backbone and this rank's shard of the output layer from the run config."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.data.tokenizer import TextTokenizer
from pipeline.models.backbones import BowBackbone, DenseBackbone
from pipeline.models.heads.base import Head
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.ffi import FFIHead
from pipeline.models.heads.rp import RPHead
from pipeline.models.text_encoder import TransformerBackbone
from pipeline.parallel.label_range import LabelRange, split_labels
from pipeline.parallel.losses import LossKind

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


def loss_kind(model: ModelConfig) -> LossKind:
    """The training loss: `model.loss`, or the head's `preferred_loss` when it is "auto"."""
    return HEADS[model.head].preferred_loss if model.loss == "auto" else model.loss


def head_label_range(model: ModelConfig, num_labels: int, mp_size: int, mp_rank: int) -> LabelRange:
    """The labels of model-parallel rank `mp_rank` of `mp_size`: contiguous, cut between the head's
    units of labels that share state (the groups of a group-shared FFI layer), sizes differing by at
    most one unit. Training, checkpoints and inference all cut the label set here."""
    unit = model.ffi.group_size if model.head == "ffi" else 1
    return split_labels(num_labels, mp_size, mp_rank, unit)


def needs_label_clusters(model: ModelConfig) -> bool:
    """Whether the head works in a clustered label order that a fresh run computes from its training
    set (`pipeline.models.label_clusters`); a resumed run reads it from the checkpoint."""
    return model.head == "ffi" and model.ffi.grouping == "cluster" and model.ffi.group_size > 1


def build_head(model: ModelConfig, label_range: LabelRange, seed: int) -> Head:
    """The output layer for the labels [label_range.start, label_range.stop) of this model-parallel rank,
    its label-sharded weights in `model.head_dtype` (initialised in float32, then rounded)."""
    head = HEADS[model.head].from_config(model, label_range, seed)
    if model.head_dtype == "bfloat16":  # the label-sharded weights; replicated layers stay float32
        for p in head.sharded_parameters():
            p.data = p.data.to(torch.bfloat16)
    return head


def sharded_state_keys(head: nn.Module, local_labels: int) -> dict[str, int]:
    """State-dict keys split by label range, each with the labels one of its rows covers: the tensors
    of a submodule whose parameters are all sharded (e.g. the FFI layer's values, bias and connection
    indices) with one row per local label (1), or the rows a module declares in `state_row_labels()`
    (the group-shared FFI layer's index sets: one row per group of G labels). The rest is replicated
    across the model-parallel group."""
    sharded = {id(p) for p in head.sharded_parameters()}
    keys: dict[str, int] = {}
    for prefix, module in head.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or not all(id(p) in sharded for p in own):
            continue
        declared = module.state_row_labels() if hasattr(module, "state_row_labels") else {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            key = f"{prefix}.{name}" if prefix else name
            if name in declared:
                keys[key] = declared[name]
            elif "." not in name and tensor.dim() and tensor.shape[0] == local_labels:
                keys[key] = 1
    return keys
