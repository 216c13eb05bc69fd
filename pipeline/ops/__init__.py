"""Custom operators: the fixed fan-in sparse layer, plain and group-shared (kernels behind torch.ops.xmc),
and its rewiring."""

from pipeline.ops.build import load_ops
from pipeline.ops.ffi_sparse import FixedFanInSparse, draw_fan_in_indices, ffi_sparse
from pipeline.ops.rewiring import rewire

__all__ = [
    "FixedFanInSparse",
    "draw_fan_in_indices",
    "ffi_sparse",
    "load_ops",
    "rewire",
]
