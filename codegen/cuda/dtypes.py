"""Storage dtypes on the device: numba array types and fp32 load/store helpers per dtype.

bfloat16 travels as its int16 bit pattern (torch's `tensor.view(torch.int16)`); the helpers
below convert those bits to and from float32 (round to nearest even, as torch does).
"""

import numpy as np

from codegen.numba_shim import (
    CUDASIM,
    boolean,
    cuda,
    float16,
    float32,
    int16,
    int32,
    int64,
    libdevice,
    types,
)

STORAGE = {
    "float32": float32,
    "float16": float16,
    "bfloat16": int16,
    "int32": int32,
    "int64": int64,
    "bool": boolean,
}


def array_type(dtype: str, ndim: int, layout: str = "C") -> types.Array:
    return types.Array(STORAGE[dtype], ndim, layout)


# The two bit casts are the only code that differs under the simulator: libdevice exists
# only on the device, and numpy reinterprets the bits there.
if CUDASIM:

    @cuda.jit(device=True)
    def _f32_from_bits(u):
        return np.uint32(u).view(np.float32)

    @cuda.jit(device=True)
    def _f32_bits(x):
        return int(np.float32(x).view(np.uint32))

else:

    @cuda.jit(device=True)
    def _f32_from_bits(u):
        return libdevice.int_as_float(int32(u))

    @cuda.jit(device=True)
    def _f32_bits(x):
        return int64(libdevice.float_as_int(x)) & 0xFFFFFFFF


@cuda.jit(device=True)
def bf16_to_f32(bits):
    return _f32_from_bits((int64(bits) & 0xFFFF) << 16)


@cuda.jit(device=True)
def f32_to_bf16(x):
    if x != x:
        return int16(0x7FC0)  # the quiet NaN torch produces
    u = _f32_bits(x)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return int16(r - 0x10000 if r >= 0x8000 else r)


@cuda.jit(device=True)
def _to_f32(x):
    return float32(x)


@cuda.jit(device=True)
def _store_f32(x):
    return float32(x)


@cuda.jit(device=True)
def _store_f16(x):
    return float16(x)


@cuda.jit(device=True)
def _store_i32(x):
    return int32(x)


@cuda.jit(device=True)
def _store_i64(x):
    return int64(x)


@cuda.jit(device=True)
def _store_bool(x):
    return x != 0


# LOAD[dtype](stored element) -> float32; STORE[dtype](float32) -> stored element.
LOAD = {
    "float32": _to_f32,
    "float16": _to_f32,
    "bfloat16": bf16_to_f32,
    "int32": _to_f32,
    "int64": _to_f32,
    "bool": _to_f32,
}
STORE = {
    "float32": _store_f32,
    "float16": _store_f16,
    "bfloat16": f32_to_bf16,
    "int32": _store_i32,
    "int64": _store_i64,
    "bool": _store_bool,
}
