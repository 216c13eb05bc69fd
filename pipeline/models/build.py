"""Build the backbone and this rank's shard of the output layer from the run config."""

from __future__ import annotations

from torch import nn

from pipeline.config import ModelConfig
from pipeline.models.backbones import BowBackbone, DenseBackbone
from pipeline.models.heads.base import Head
from pipeline.models.heads.dense import DenseHead
from pipeline.models.heads.ffi import FFIHead
from pipeline.models.heads.rp import RPHead
from pipeline.parallel.label_range import LabelRange


def build_backbone(model: ModelConfig, feature_kind: str, num_features: int) -> nn.Module:
    """`num_features` is the vocabulary size for bag-of-words data, the input width for dense data."""
    if model.backbone == "bow":
        if feature_kind != "bow":
            raise ValueError(
                f"model.backbone='bow' needs bag-of-words data, the manifest says {feature_kind!r}"
            )
        return BowBackbone(num_features, model.embed_dim, model.hidden_dims, model.dropout)
    if feature_kind != "dense":
        raise ValueError(f"model.backbone='dense' needs dense features, the manifest says {feature_kind!r}")
    return DenseBackbone(num_features, model.embed_dim, model.hidden_dims)


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
