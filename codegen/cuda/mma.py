"""Tensor-core products for attention tiles: `mma.sync.m16n8k16` with fp32 accumulation, on
bf16 or fp16 operands held as packed pairs in int32 registers, in PTX's fragment layout.

Fragments of one warp (g = lane // 4, c = lane % 4; the low half of a pair is the element of
the even index):
  A (16 x 16, row-major): a0 = row g, cols 2c, 2c + 1; a1 = row g + 8; a2 = cols + 8; a3 both.
  B (16 x 8, k x n):      b0 = k 2c, 2c + 1 of column g; b1 = k + 8.
  C, D (16 x 8, fp32):    c0, c1 = row g, columns 2c, 2c + 1; c2, c3 = row g + 8.
On the GPU `mma` is one inline PTX instruction. The simulator has no tensor cores: there the
lanes exchange their fragments through shared memory, each rebuilds the warp's A and B from
them (numpy) and keeps its four sums of the product, so every thread of the block must make
the same calls (as with warp.py's shuffles).
"""

import numpy as np
from llvmlite import ir

from codegen.cuda.dtypes import f32_to_bf16
from codegen.numba_shim import CUDASIM, cuda, int32, int64, intrinsic, libdevice, types

MMA_DTYPES = {"bfloat16": "bf16", "float16": "f16"}
WARP = 32
EXCHANGE = 6  # int32 slots per thread for the simulator's fragment exchange


if CUDASIM:

    @cuda.jit(device=True)
    def _f16_bits(x):  # numpy stands in for libdevice
        return int(np.float16(x).view(np.uint16))

else:

    @cuda.jit(device=True)
    def _f16_bits(x):
        return int64(libdevice.float2half_rn(x)) & 0xFFFF


@cuda.jit(device=True)
def _bf16_bits(x):
    return int64(f32_to_bf16(x)) & 0xFFFF


def packer(dtype: str):
    """Device function: (lo, hi) float32 -> one int32 holding both, rounded to dtype."""
    bits = _bf16_bits if dtype == "bfloat16" else _f16_bits

    @cuda.jit(device=True)
    def pack(lo, hi):
        h = bits(hi)
        return int32(((h - 0x10000 if h >= 0x8000 else h) << 16) | bits(lo))

    return pack


@cuda.jit(device=True)
def pair(lo, hi):
    """Two stored 16-bit elements (int16 bit patterns) -> one int32 pair, lo in the low half."""
    return int32((int64(hi) << 16) | (int64(lo) & 0xFFFF))


def _matrices(frags, dtype: str):
    """The warp's A (16 x 16) and B (16 x 8) from its lanes' fragments [32, 6] (numpy)."""
    words = frags.astype(np.int64) & 0xFFFFFFFF
    halves = np.stack([words & 0xFFFF, words >> 16], axis=-1).astype(np.uint16)  # [32, 6, 2]
    if dtype == "bfloat16":
        values = (halves.astype(np.uint32) << 16).view(np.float32)
    else:
        values = halves.view(np.float16).astype(np.float32)
    a, b = np.zeros((16, 16), np.float32), np.zeros((16, 8), np.float32)
    for lane in range(WARP):
        g, c = lane // 4, 2 * (lane % 4)
        v = values[lane]
        a[g, c : c + 2], a[g + 8, c : c + 2] = v[0], v[1]
        a[g, c + 8 : c + 10], a[g + 8, c + 8 : c + 10] = v[2], v[3]
        b[c : c + 2, g], b[c + 8 : c + 10, g] = v[4], v[5]
    return a, b


def _simulated(dtype: str):
    @cuda.jit(device=True)
    def mma(xchg, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        tid = cuda.threadIdx.x
        lane = tid % WARP
        base = tid - lane
        mine = (a0, a1, a2, a3, b0, b1)
        for i in range(EXCHANGE):
            xchg[tid, i] = mine[i]
        cuda.syncthreads()
        a, b = _matrices(xchg[base : base + WARP].copy(), dtype)
        cuda.syncthreads()  # read before the next exchange overwrites xchg
        d = a @ b
        g, c = lane // 4, 2 * (lane % 4)
        return c0 + d[g, c], c1 + d[g, c + 1], c2 + d[g + 8, c], c3 + d[g + 8, c + 1]

    return mma


def _instruction(dtype: str):
    kind = MMA_DTYPES[dtype]
    asm = (
        f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
        "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};"
    )
    constraints = ",".join(["=f"] * 4 + ["r"] * 6 + ["f"] * 4)
    result = types.UniTuple(types.float32, 4)

    def typer(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        sig = result(*([types.int32] * 6 + [types.float32] * 4))

        def codegen(context, builder, sig, args):
            f32, i32 = ir.FloatType(), ir.IntType(32)
            fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
            values = builder.call(ir.InlineAsm(fnty, asm, constraints), args)
            parts = [builder.extract_value(values, i) for i in range(4)]
            return context.make_tuple(builder, result, parts)

        return sig, codegen

    typer.__name__ = f"mma_{kind}"
    instruction = intrinsic(typer)

    @cuda.jit(device=True)
    def mma(xchg, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
        return instruction(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3)

    return mma


def mma_for(dtype: str):
    """Device function mma(xchg, a0..a3, b0, b1, c0..c3) -> (d0, d1, d2, d3): D = A @ B + C.

    xchg: a shared int32 array (threads, EXCHANGE), used only by the simulator."""
    if dtype not in MMA_DTYPES:
        raise ValueError(f"tensor-core products take {sorted(MMA_DTYPES)}, not {dtype}")
    return _simulated(dtype) if CUDASIM else _instruction(dtype)
