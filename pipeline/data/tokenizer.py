"""TextTokenizer: the model's own fast tokenizer, run inside the loader's worker processes.

The object is cheap to pickle and to fork: it holds only the resolved folder and `max_length`, and
loads `transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, use_fast=True)` on
its first call in each process (never at construction), so every DataLoader worker loads its own and
the trainer's main process need not load one at all. Nothing is ever downloaded.

Threads: the Rust tokenizer's own thread pool is switched off (`TOKENIZERS_PARALLELISM=false`) inside
DataLoader workers, where the workers already are the parallelism (their threads would only contend
for the same cores), and, unless the user set the variable, in the main process too: the loader forks
fresh workers every epoch, and a process that has used that pool before a fork makes the library
print a warning at each fork (and risks a deadlock in the child).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import get_worker_info

from pipeline.hf_folder import resolve_model_folder


class TokenizerError(ValueError):
    """The model folder has no usable fast tokenizer."""


class TextTokenizer:
    """Texts -> (input_ids, attention_mask), int64 [B, T]: special tokens added, truncated to
    `max_length` tokens, padded to the longest row of this batch (T <= max_length).

    path: a Hugging Face model folder or `pkg:NAME` (see pipeline.hf_folder), resolved against `base`.
    """

    def __init__(self, path: str | os.PathLike, max_length: int = 128, *, base: str | Path | None = None):
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(
                f"max_length must be an integer >= 2 (room for the special tokens), got {max_length}"
            )
        self.folder = str(resolve_model_folder(str(path), base))
        self.max_length = max_length
        self._tokenizer: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"folder": self.folder, "max_length": self.max_length}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.folder, self.max_length = state["folder"], state["max_length"]
        self._tokenizer = None

    def __repr__(self) -> str:
        return f"TextTokenizer({self.folder!r}, max_length={self.max_length})"

    @property
    def tokenizer(self) -> Any:
        """The loaded `PreTrainedTokenizerFast` (loaded on first use in this process)."""
        if self._tokenizer is None:
            self._tokenizer = self._load()
        return self._tokenizer

    def _load(self) -> Any:
        if get_worker_info() is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
        else:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(self.folder, local_files_only=True, use_fast=True)
        except (OSError, ValueError, KeyError) as exn:
            raise TokenizerError(f"{self.folder}: cannot load a tokenizer: {exn}") from None
        if not getattr(tok, "is_fast", False):
            raise TokenizerError(
                f"{self.folder}: no fast tokenizer (tokenizer.json, or a slow one transformers can "
                f"convert); got {type(tok).__name__}"
            )
        if tok.pad_token_id is None:
            raise TokenizerError(f"{self.folder}: the tokenizer has no pad token: batches cannot be padded")
        return tok

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (every id in input_ids is below it)."""
        return len(self.tokenizer)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) of `texts`, both int64 [len(texts), T]; mask 0 on padding."""
        if not texts:
            empty = torch.zeros((0, 0), dtype=torch.int64)
            return empty, empty.clone()
        enc = self.tokenizer(
            list(texts),
            padding="longest",
            truncation=True,
            max_length=self.max_length,
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="pt",
        )
        return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)
