"""QuantLinear: y = x @ dequantize(weight).T (+ bias), int4 or fp8 weights (see ir/quant.py).

A few rows (at most consts.quant_gemv_rows: decode batches) run a fused dequant GEMV (one
built for each power of two of rows up to it) that
reads the packed weights once, as words: int4 an int32 word of eight 4-bit codes (all in one
group, group sizes being multiples of 8), fp8 an int64 word of eight e4m3 bytes (an int32 word
of four where the width is not a multiple of 8; other widths get no kernel: the node stays a
torch op). A warp owns ROWS_PER_WARP output rows; lane j reads words j, j + 32, ... of each,
32 bytes of every row in flight before it uses any. Each word's inputs are dequantized in
float32 ((q - zero) * scale, the code made a float by or-ing it into 2^23's mantissa; fp8
bytes decoded by bit arithmetic, times the row's scale) and, unlike the reference, which
rounds its dequantized weight to x's dtype, kept in float32 (H200, 4096 x 14336 at one row:
rounding each weight and converting codes with I2F cost 73 us), then multiplied into
every row of x (read as 8-byte words from global memory, where L1/L2 serve the other warps) in
float32. A lane holds an accumulator per output row and x row, up to the compile-time maximum
of x rows, so that every loop has a constant trip count and they stay in registers; shuffles
sum the lanes, lane 0 adds the bias and stores the sums rounded to the dtype.

More rows dequantize the whole weight into a scratch buffer in x's dtype (a thread per word,
the same arithmetic), multiply through cuBLAS (a library step) and, with a bias, add it in
place: one rounding more than the reference's F.linear, which adds it before its only one.
"""

import numpy as np

from codegen.cuda.dtypes import LOAD, STORE, _f32_from_bits
from codegen.cuda.warp import warp_sum
from codegen.cuda.words import unpacker
from codegen.numba_shim import CUDASIM, cuda, float32, int32, int64
from codegen.registry import (
    BuildConstants,
    Gemm,
    Kernel,
    OpKernels,
    Param,
    Scratch,
    cdiv,
    kernel_for,
    kernel_name,
    num_rows,
)
from ir.ops import QuantLinear
from ir.types import TensorType

WARP = 32
WARPS = 2 if CUDASIM else 8  # warps of a GEMV block
ROWS_PER_WARP = 2  # output rows a GEMV warp owns: its loads of both rows in flight together
BLOCK = 64 if CUDASIM else 256  # threads of a dequant or bias-add block
X_PER_WORD = {"bfloat16": 4, "float16": 4, "float32": 2}  # elements of x in an 8-byte word
WORD_TYPES = {"int32": int32, "int64": int64}
NAN = np.float32(np.nan)
INLINE = {} if CUDASIM else {"forceinline": True}  # NVVM inlines these: see words_from
E4M3_BIAS = np.float32(2.0**120)  # 2^(127 - 7): float32's exponent bias less e4m3's
# float32 bits of 2^23: a 4-bit code or-ed into the mantissa makes 2^23 + code, with no
# int-to-float conversion (a quarter-rate instruction)
MAGIC, MAGIC_F = 0x4B000000, np.float32(2.0**23)


def weight_word(fmt: str, k: int) -> tuple[int, str]:
    """(inputs in a word of the packed weight, the word's dtype)."""
    if fmt == "int4":
        return 8, "int32"
    return (8, "int64") if k % 8 == 0 else (4, "int32")


def gemv_unroll(word: str) -> int:
    """Words of each row a GEMV lane loads before it uses any: 32 bytes."""
    return 2 if CUDASIM else 8 if word == "int32" else 4


@cuda.jit(device=True)
def e4m3_to_f32(b):
    """An e4m3fn byte (0..255) as float32, exactly: its sign, exponent and mantissa moved into
    a float32's and the bias made up by an exact multiply, which also scales exponent 0 (read
    as a float32 subnormal: no fastmath) to e4m3's subnormals. e4m3fn has no infinities:
    0x7F and 0xFF are its NaNs."""
    if (b & 0x7F) == 0x7F:
        return NAN
    return _f32_from_bits(((b & 0x80) << 24) | ((b & 0x7F) << 20)) * E4M3_BIAS


def dequantizer(fmt: str, dtype: str, group: int, per_word: int):
    """Device function: wf[j, e] = input e of weight word i of row n, dequantized in float32
    (not yet rounded to the dtype); z is unused by fp8."""
    if fmt == "fp8":

        @cuda.jit(device=True)
        def fp8_word(wf, j, word, s, z, n, i):
            scale = s[n]
            for e in range(per_word):
                wf[j, e] = e4m3_to_f32((int64(word) >> (8 * e)) & 0xFF) * scale

        return fp8_word
    load, words_per_group = LOAD[dtype], group // 8

    @cuda.jit(device=True)
    def int4_word(wf, j, word, s, z, n, i):
        g = i // words_per_group
        scale, offset = load(s[n, g]), MAGIC_F + load(z[n, g])
        for e in range(8):  # 2^23 + q, exactly, less 2^23 + zero: q - zero, exactly
            wf[j, e] = (_f32_from_bits(((word >> (4 * e)) & 15) | MAGIC) - offset) * scale

    return int4_word


def _gemv_body(fmt, group, k, n, dtype, bias: bool, max_rows: int):
    """Device function gemv(out, x, w, s, z, b): the few-rows kernel's work."""
    per_word, word = weight_word(fmt, k)
    per_x, words = X_PER_WORD[dtype], k // per_word
    x_words, last, rpw, nt = per_word // per_x, words - 1, ROWS_PER_WARP, WARPS * WARP
    unroll = gemv_unroll(word)
    chunks, word_type = cdiv(words, WARP * unroll), WORD_TYPES[word]
    dequant, unpack = dequantizer(fmt, dtype, group, per_word), unpacker(dtype, per_x)
    load, store, lane_sum = LOAD[dtype], STORE[dtype], warp_sum(WARP)

    @cuda.jit(device=True)
    def with_bias(b, row):
        return load(b[row])

    @cuda.jit(device=True)
    def no_bias(b, row):  # b is not a bias: do not read it
        return float32(0.0)

    bias_of = with_bias if bias else no_bias

    def words_from(u: int):
        """Device function: words u, u + 1, ... of a lane's chunk into the accumulators, each
        word its own function with u a constant. NVVM leaves a loop with so large a body
        rolled, and the words it indexes in local memory; inlined, they stay in registers."""
        if u == unroll:

            @cuda.jit(device=True)
            def chunk_done(acc, wf, wv, x, s, z, n0, i0, rows):
                pass

            return chunk_done
        rest = words_from(u + 1)

        @cuda.jit(device=True, **INLINE)
        def word_u(acc, wf, wv, x, s, z, n0, i0, rows):
            i = i0 + u * WARP
            if i < words:
                for j in range(rpw):  # float32 weights: not rounded to the dtype
                    dequant(wf, j, wv[j, u], s, z, min(n0 + j, n - 1), i)
                for r in range(max_rows):
                    if r < rows:
                        for h in range(x_words):
                            xw = x[r, i * x_words + h]
                            for e in range(per_x):
                                xe = unpack(xw, e)
                                for j in range(rpw):
                                    acc[j, r] += wf[j, h * per_x + e] * xe
            rest(acc, wf, wv, x, s, z, n0, i0, rows)

        return word_u

    chunk_words = words_from(0)

    @cuda.jit(device=True)
    def gemv(out, x, w, s, z, b):
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        n0 = (cuda.blockIdx.x * WARPS + warp) * rpw
        rows = x.shape[0]
        xchg = cuda.shared.array(nt, float32)  # the simulator's shuffles
        acc = cuda.local.array((rpw, max_rows), float32)
        for j in range(rpw):
            for r in range(max_rows):
                acc[j, r] = float32(0.0)
        wv = cuda.local.array((rpw, unroll), word_type)
        wf = cuda.local.array((rpw, per_word), float32)
        for chunk in range(chunks):
            i0 = chunk * unroll * WARP + lane
            for j in range(rpw):  # every load first, clamped into the weight: all in flight
                row = min(n0 + j, n - 1)
                for u in range(unroll):
                    wv[j, u] = w[row, min(i0 + u * WARP, last)]
            chunk_words(acc, wf, wv, x, s, z, n0, i0, rows)
        for r in range(max_rows):
            if r < rows:  # the same in every lane (and, simulated, in every thread)
                for j in range(rpw):
                    acc[j, r] = lane_sum(xchg, acc[j, r])
        if lane == 0:
            for j in range(rpw):
                if n0 + j < n:
                    add = bias_of(b, n0 + j)
                    for r in range(max_rows):
                        if r < rows:
                            out[r, n0 + j] = store(acc[j, r] + add)

    return gemv


def _gemv_kernel(body, fmt: str, bias: bool):
    """The kernel over the op's own arguments: fp8 has no zeros, a bias may be absent (the
    body is given the scales in their place, and reads neither)."""
    if fmt == "int4" and bias:

        @cuda.jit
        def quant_gemv(out, x, w, s, z, b):
            body(out, x, w, s, z, b)

    elif fmt == "int4":

        @cuda.jit
        def quant_gemv(out, x, w, s, z):
            body(out, x, w, s, z, s)

    elif bias:

        @cuda.jit
        def quant_gemv(out, x, w, s, b):
            body(out, x, w, s, s, b)

    else:

        @cuda.jit
        def quant_gemv(out, x, w, s):
            body(out, x, w, s, s, s)

    return quant_gemv


def _dequant_kernel(fmt, group, k, n, dtype):
    """wd [n * k] = the weight in the dtype: a thread per packed word."""
    per_word, _ = weight_word(fmt, k)
    words, store = k // per_word, STORE[dtype]
    dequant = dequantizer(fmt, dtype, group, per_word)

    @cuda.jit(device=True)
    def body(wd, w, s, z):
        t = cuda.grid(1)
        if t < n * words:
            row, i = t // words, t % words
            wf = cuda.local.array((1, per_word), float32)
            dequant(wf, 0, w[row, i], s, z, row, i)
            for e in range(per_word):
                wd[t * per_word + e] = store(wf[0, e])

    if fmt == "int4":

        @cuda.jit
        def dequant_weight(wd, w, s, z):
            body(wd, w, s, z)

        return dequant_weight

    @cuda.jit
    def dequant_weight(wd, w, s):
        body(wd, w, s, s)

    return dequant_weight


def _bias_kernel(dtype: str, n: int):
    """out [rows * n] += bias, in place, rounded to the dtype."""
    load, store = LOAD[dtype], STORE[dtype]

    @cuda.jit
    def bias_add(out, b):
        t = cuda.grid(1)
        if t < out.shape[0]:
            out[t] = store(load(out[t]) + load(b[t % n]))

    return bias_add


@kernel_for(QuantLinear)
def build_quant_linear(op: QuantLinear, inputs: tuple[TensorType, ...], consts: BuildConstants):
    op.infer(*inputs)  # ValueError unless the inputs are x and a quantized weight of its width
    x, qweight, *rest = inputs
    fmt, dtype, k, n = op.format, x.dtype, x.shape[-1], qweight.shape[0]
    if dtype not in X_PER_WORD:
        raise ValueError(f"QuantLinear kernels take {tuple(X_PER_WORD)} inputs, got {x}")
    if fmt == "fp8" and k % 4:
        raise ValueError(f"fp8 weights are read as 4-byte words: width {k} is not a multiple")
    per_word, word = weight_word(fmt, k)
    scales = Param("in2", dtype, 2) if fmt == "int4" else Param("in2", "float32", 1)
    packed = (Param("in1", word, 2), scales, *([Param("in3", dtype, 2)] if fmt == "int4" else []))
    bias = (Param(f"in{len(packed) + 1}", dtype, 1),) if len(rest) == len(packed) else ()
    rows, max_rows = (lambda s: num_rows(x, s)), consts.quant_gemv_rows
    more = lambda s: rows(s) > max_rows  # noqa: E731
    key = (fmt, op.group_size, k, n, dtype)
    params, grid = (Param("weight", dtype, 1), *packed), fixed(cdiv(n * (k // per_word), BLOCK))
    dequant = Kernel(
        kernel_name("dequant", *key, BLOCK), _dequant_kernel(*key), params, (BLOCK,), grid, more
    )
    steps = [dequant, Gemm("out0", "in0", "weight", more)]
    if bias:
        params, grid = (Param("out0", dtype, 1), *bias), lambda s: (cdiv(rows(s) * n, BLOCK),)
        name = kernel_name("bias_add", n, dtype, BLOCK)
        steps.append(Kernel(name, _bias_kernel(dtype, n), params, (BLOCK,), grid, more))
    gemvs, fewer = [], 0
    for most in gemv_buckets(max_rows):  # the steps in launch order: GEMVs first
        fn = _gemv_kernel(_gemv_body(*key, bool(bias), most), fmt, bool(bias))
        params = (Param("out0", dtype, 2), Param("in0", "int64", 2), *packed, *bias)
        shape = (bool(bias), most, WARPS, ROWS_PER_WARP, gemv_unroll(word))
        name = kernel_name("quant_gemv", *key, *shape)
        grid = fixed(cdiv(n, WARPS * ROWS_PER_WARP))
        when = lambda s, lo=fewer, hi=most: lo < rows(s) <= hi  # noqa: E731
        gemvs.append(Kernel(name, fn, params, (WARPS * WARP,), grid, when))
        fewer = most
    return OpKernels((*gemvs, *steps), (Scratch("weight", dtype, lambda s: (n, k)),))


def gemv_buckets(max_rows: int) -> list[int]:
    """The row counts GEMVs are built for (each takes the rows above the last's): powers of two
    up to max_rows. A kernel's loops over rows run to its bucket, so one row does not pay for
    eight (H200, 4096 x 14336 int4: see benchmarks/NOTES.md)."""
    return sorted({min(1 << i, max_rows) for i in range(max_rows.bit_length() + 1)} - {0})


def fixed(blocks: int):
    """A grid of `blocks` blocks at every size."""
    return lambda s: (blocks,)
