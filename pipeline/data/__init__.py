"""Data pipeline: converters to WebDataset shards and a streaming loader split by rank and worker.

from pipeline.data import read_manifest, make_loader, Batch
from pipeline.data import TextTokenizer, convert_text, text_batches   # raw text
"""

from pipeline.data.collate import Batch
from pipeline.data.convert import convert_dense, convert_text, convert_xmc, ensure_synthetic, write_synthetic
from pipeline.data.errors import DataError
from pipeline.data.in_memory import text_batches
from pipeline.data.loader import ShardLoader, make_loader
from pipeline.data.manifest import (
    LABEL_NAMES,
    Manifest,
    ShardInfo,
    read_label_names,
    read_manifest,
    write_label_names,
)
from pipeline.data.synthetic import SyntheticTask
from pipeline.data.text_source import read_text_rows
from pipeline.data.tokenizer import TextTokenizer, TokenizerError

__all__ = [
    "LABEL_NAMES",
    "Batch",
    "DataError",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "SyntheticTask",
    "TextTokenizer",
    "TokenizerError",
    "convert_dense",
    "convert_text",
    "convert_xmc",
    "ensure_synthetic",
    "make_loader",
    "read_label_names",
    "read_manifest",
    "read_text_rows",
    "text_batches",
    "write_label_names",
    "write_synthetic",
]
