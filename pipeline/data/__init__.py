"""Data pipeline: converters to WebDataset shards and a streaming loader split by rank and worker.

from pipeline.data import read_manifest, make_loader, Batch
"""

from pipeline.data.collate import Batch
from pipeline.data.convert import convert_dense, convert_xmc, ensure_synthetic, write_synthetic
from pipeline.data.errors import DataError
from pipeline.data.loader import ShardLoader, make_loader
from pipeline.data.manifest import Manifest, ShardInfo, read_manifest
from pipeline.data.synthetic import SyntheticTask

__all__ = [
    "Batch",
    "DataError",
    "Manifest",
    "ShardInfo",
    "ShardLoader",
    "SyntheticTask",
    "convert_dense",
    "convert_xmc",
    "ensure_synthetic",
    "make_loader",
    "read_manifest",
    "write_synthetic",
]
