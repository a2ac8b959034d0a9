"""Cache rows read as wide integer words: which word a dtype and head size allow, and the
float32 value of element e of a word (bf16, fp16 and fp32 unpacked with integer operations)."""

import numpy as np

from codegen.cuda.dtypes import LOAD, _f32_from_bits
from codegen.numba_shim import cuda, int64

WORDS = {16: ((4, "int64"), (2, "int32")), 32: ((2, "int64"),)}  # element bits -> word options
UNPACK_OPS = {"bfloat16": 2, "float16": 6, "float32": 2}  # integer ops to unpack an element


def word_for(dtype: str, dim: int) -> tuple[int, str]:
    """(elements per word, word dtype) for rows of `dim` elements: the widest that divides."""
    bits = 32 if dtype == "float32" else 16
    return next(((n, w) for n, w in WORDS[bits] if dim % n == 0), (1, dtype))


@cuda.jit(device=True)
def f16_bits_to_f32(h):
    """float16 bit pattern (0..0xFFFF) -> float32, exactly (subnormals kept: no fastmath)."""
    bits = ((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)  # exponent still biased by 15, not 127
    if h & 0x7C00 == 0x7C00:  # inf or nan
        return _f32_from_bits(bits | 0x7F800000)
    return _f32_from_bits(bits) * np.float32(2.0**112)


def unpacker(dtype: str, per_word: int):
    """Device function: element e (a constant) of a cache word, as float32."""
    if per_word == 1:
        load = LOAD[dtype]

        @cuda.jit(device=True)
        def element(w, e):
            return load(w)

        return element
    if dtype == "bfloat16":

        @cuda.jit(device=True)
        def bf16_at(w, e):  # its 16 bits moved to the top of a float32's
            w = int64(w)
            return _f32_from_bits(((w << 16) if e == 0 else (w >> (16 * e - 16))) & 0xFFFF0000)

        return bf16_at
    if dtype == "float16":

        @cuda.jit(device=True)
        def f16_at(w, e):
            return f16_bits_to_f32((int64(w) >> (16 * e)) & 0xFFFF)

        return f16_at

    @cuda.jit(device=True)
    def f32_at(w, e):
        return _f32_from_bits((int64(w) >> (32 * e)) & 0xFFFFFFFF)

    return f32_at
