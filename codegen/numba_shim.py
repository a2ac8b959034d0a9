"""The one place the project imports numba (with the numpy compatibility fix it needs first)."""

import numpy as np

# numba 0.68 still references np.row_stack, which numpy 2.5 removed.
if not hasattr(np, "row_stack"):
    np.row_stack = np.vstack

from numba import cuda, types
from numba.core import config as _config
from numba.cuda import libdevice
from numba.cuda.extending import intrinsic

CUDASIM: bool = bool(_config.ENABLE_CUDASIM)

boolean = types.boolean
int16 = types.int16
int32 = types.int32
int64 = types.int64
uint32 = types.uint32
uint64 = types.uint64
float16 = types.float16
float32 = types.float32

__all__ = [
    "CUDASIM",
    "boolean",
    "cuda",
    "float16",
    "float32",
    "int16",
    "int32",
    "int64",
    "intrinsic",
    "libdevice",
    "types",
    "uint32",
    "uint64",
]
