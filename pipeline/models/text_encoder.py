"""The transformer backbone: a Hugging Face encoder over tokenized text, pooled to one vector per text.

    input_ids, attention_mask [B, T] int64 -> encoder -> last hidden states [B, T, width]
    -> pooling (the [CLS] token, or the mean over non-padding tokens) [B, width]
    -> projection to embed_dim when the widths differ [B, embed_dim]

Like every backbone it runs inside the DeepSpeed engine (ZeRO partitions its optimizer state,
gradients, or with stage 3 its parameters). Its weights come from a local folder read with
`local_files_only=True` (a run never downloads), or are drawn at random in the folder's architecture
(`from_scratch`). The encoder's own pooler (BERT's dense + tanh over [CLS]) is dropped: it is not
used, and a parameter that never gets a gradient only costs optimizer state. On GPU ranks the encoder
runs under bf16 autocast (fp32 weights and optimizer; the pooled output is returned in float32).

Cost per text of T tokens and L layers of width w: about 2 * L * T * (12 w^2 + 2 T w) multiply-adds
forward, twice that backward; all-MiniLM-L6-v2 (L 6, w 384) at T = 32 is ~0.7 GFLOP forward.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from pipeline.config import EncoderConfig
from pipeline.hf_folder import resolve_model_folder


def load_encoder(encoder: EncoderConfig) -> nn.Module:
    """The Hugging Face model of `encoder.path` (pretrained) or of its architecture at the
    `from_scratch` size (random, from torch's current RNG, so the same on every rank after a seed)."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

    folder = resolve_model_folder(encoder.path)
    if encoder.from_scratch is None:
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    else:
        s = encoder.from_scratch
        has_config = (Path(folder) / "config.json").is_file()
        config = AutoConfig.from_pretrained(folder, local_files_only=True) if has_config else BertConfig()
        config.update(
            {
                "num_hidden_layers": s.layers,
                "hidden_size": s.width,
                "num_attention_heads": s.heads,
                "intermediate_size": s.intermediate or 4 * s.width,
                "vocab_size": len(AutoTokenizer.from_pretrained(folder, local_files_only=True)),
                "max_position_embeddings": max(encoder.max_length, 8),
            }
        )
        model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if encoder.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, w] hidden states -> [B, w]: the first token's, or the mean over attended tokens (a row
    with no attended token pools to zeros)."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class TransformerBackbone(nn.Module):
    """Encoder + pooling + optional projection; `encoder_parameters()` are the ones that train at
    `train.encoder_lr`, the projection's at the backbone rate."""

    def __init__(self, encoder: nn.Module, pooling: str, embed_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        width = encoder.config.hidden_size
        self.projection = nn.Linear(width, embed_dim) if embed_dim != width else None

    @classmethod
    def from_config(cls, encoder: EncoderConfig, embed_dim: int) -> TransformerBackbone:
        return cls(load_encoder(encoder), encoder.pooling, embed_dim)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=input_ids.is_cuda):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            h = pool(hidden.float(), attention_mask, self.pooling)  # sums in float32
            h = self.projection(h) if self.projection is not None else h
        return h.float()
