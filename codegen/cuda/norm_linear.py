"""NormLinear: residual add + RMSNorm + a projection (+ SiLU-mul of its halves).

One row (one token: a lone sequence's decode step) runs one GEMV kernel. Each block first puts
the first weight words of its rows in flight, then normalizes the whole input itself (x +
residual rounded to the dtype, the sum of squares by warp shuffles and one barrier, the norm's
two roundings as in AddRMSNorm) into shared memory, so no kernel of its own and no launch gap
sits before the GEMV; block 0 also writes the sum. A warp owns rows_per_warp output rows (with
silu_mul: as many gate rows and the matching up rows), reads each weight row as 8-byte words,
lane j taking words j, j + 32, ..., UNROLL words of every row in flight at once, and sums its
lanes by shuffles. Measured on the H200 at Llama-3.1-8B's one-row shapes (32 layers' weights
in a graph): QKV 19.0 -> 15.9 us, gate/up + SiLU-mul 62.5 -> 58.2 us against AddRMSNorm +
cuBLAS (+ SiluMul).

More rows run the AddRMSNorm kernel into a scratch buffer, the projection through cuBLAS
(a library step) and, for silu_mul, the SiluMul kernel over the projection's two halves.
"""

import math
from dataclasses import replace

import numpy as np

from codegen.cuda.dtypes import LOAD, STORE
from codegen.cuda.rmsnorm import build_add_rmsnorm, scaled
from codegen.cuda.silu_mul import silu_mul_kernel, silu_rounded
from codegen.cuda.warp import warp_sum
from codegen.cuda.words import unpacker
from codegen.numba_shim import CUDASIM, cuda, float32, int64, uint64
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
from ir.ops import AddRMSNorm, NormLinear
from ir.types import TensorType

WARP = 32
WARPS = 2 if CUDASIM else 8
UNROLL = 2 if CUDASIM else 8  # words of each row a lane loads before using any
MAX_SHARED_FLOATS = 10240  # the normalized input lives in shared memory as float32
PER_WORD = {"bfloat16": 4, "float16": 4, "float32": 2}  # elements in an 8-byte word


def rows_per_warp(act: str | None, outs: int, consts: BuildConstants) -> int:
    """Output rows a warp owns. gate/up: 2 pairs (H200, Llama-3.1-8B: 63.1 / 58.2 / 66.6 us at
    1 / 2 / 4 pairs, twice as many weight rows). Plain projections: the fewest of 2 or 3 rows
    that keep the grid within consts.gemv_blocks, else 4. Every block normalizes the whole
    input first, so fewer, larger blocks pay that less often, while a grid that leaves some SMs
    one block fewer than others waits on them (H200, 8 warps: QKV's 6144 rows 18.9 / 15.9 /
    17.1 us at 2 / 3 / 4 rows, a 4096-row one 12.4 / 13.1 / 14.7 us)."""
    if act == "silu_mul":
        return 2
    return next((r for r in (2, 3) if cdiv(outs, WARPS * r) <= consts.gemv_blocks), 4)


def gemv_supported(x: TensorType) -> bool:
    k = x.shape[-1]
    return x.dtype in PER_WORD and k % PER_WORD[x.dtype] == 0 and k <= MAX_SHARED_FLOATS


def _gemv(op: NormLinear, x: TensorType, w: TensorType, consts: BuildConstants, when) -> Kernel:
    """The one-row kernel (launched when `when` holds: x has one row)."""
    dtype, k, n = x.dtype, x.shape[-1], w.shape[0]
    per_word = PER_WORD[dtype]
    words, nt = k // per_word, WARPS * WARP
    chunks = cdiv(words, WARP * UNROLL)  # a lane's trips over a row
    padded = chunks * WARP * UNROLL  # words of a row the trips cover (zeros past `words`)
    spans = cdiv(padded, nt)  # a thread's trips over the input
    silu = op.act == "silu_mul"
    outs = n // 2 if silu else n
    rows = rows_per_warp(op.act, outs, consts)
    wrows = 2 * rows if silu else rows  # weight rows a warp reads at once
    held, shared = spans * per_word, padded * per_word
    unpack, load, store = unpacker(dtype, per_word), LOAD[dtype], STORE[dtype]
    scale, silu_act, lane_sum = scaled(dtype, dtype, dtype), silu_rounded(dtype), warp_sum(WARP)
    inv_k, eps = np.float32(1.0 / k), np.float32(op.eps)
    U_WORDS, U_HALF, LAST = uint64(words), n // 2, words - 1

    @cuda.jit(device=True)
    def weight_row(r0, r):
        """Weight row of the warp's r-th row (silu: gates, then the matching ups), clamped."""
        row = min(r0 + (r % rows), outs - 1)
        return row + U_HALF if silu and r >= rows else row

    @cuda.jit(device=True)
    def load_words(wv, w, r0, chunk, lane):
        """Every load unconditional (clamped into the row), so all are in flight at once;
        the words past the row's end meet zeros of the input."""
        for r in range(wrows):
            base = uint64(weight_row(r0, r)) * U_WORDS
            for u in range(UNROLL):
                i = min((chunk * UNROLL + u) * WARP + lane, LAST)
                wv[r, u] = w[base + uint64(i)]

    @cuda.jit
    def norm_gemv(out, s_out, x, res, g, w):
        tid = cuda.threadIdx.x
        warp, lane = tid // WARP, tid % WARP
        r0 = (cuda.blockIdx.x * WARPS + warp) * rows
        wv = cuda.local.array((wrows, UNROLL), int64)
        load_words(wv, w, r0, 0, lane)  # in flight while the block normalizes
        xs = cuda.shared.array(
            shared, float32
        )  # the normed input: element e of word i at e*padded+i
        red = cuda.shared.array(WARPS, float32)
        xchg = cuda.shared.array(nt, float32)  # the simulator's shuffles
        xw = cuda.local.array(spans, int64)
        rw = cuda.local.array(spans, int64)
        gw = cuda.local.array(spans, int64)
        for j in range(spans):  # every load first, clamped: no branch between them
            i = min(tid + j * nt, LAST)
            xw[j], rw[j], gw[j] = x[i], res[i], g[i]
        sv = cuda.local.array(held, float32)
        sumsq = float32(0.0)
        for j in range(spans):
            live = tid + j * nt < words
            for e in range(per_word):
                s = load(store(unpack(xw[j], e) + unpack(rw[j], e)))  # the sum as stored
                s = s if live else float32(0.0)
                sv[j * per_word + e] = s
                sumsq += s * s
        sumsq = lane_sum(xchg, sumsq)
        if lane == 0:
            red[warp] = sumsq
        cuda.syncthreads()
        total = float32(0.0)
        for i in range(WARPS):  # the same order in every thread and block
            total += red[i]
        rstd = float32(1.0) / math.sqrt(total * inv_k + eps)
        for j in range(spans):
            i = tid + j * nt
            if i < padded:
                for e in range(per_word):
                    s = sv[j * per_word + e]
                    y = load(scale(unpack(gw[j], e), s, rstd))
                    xs[e * padded + i] = y if i < words else float32(0.0)
                    if cuda.blockIdx.x == 0 and i < words:
                        s_out[i * per_word + e] = store(s)
        cuda.syncthreads()
        acc = cuda.local.array(wrows, float32)
        for r in range(wrows):
            acc[r] = float32(0.0)
        for chunk in range(chunks):
            if chunk > 0:
                load_words(wv, w, r0, chunk, lane)
            for u in range(UNROLL):
                i = (chunk * UNROLL + u) * WARP + lane
                for e in range(per_word):
                    xf = xs[e * padded + i]
                    for r in range(wrows):
                        acc[r] += unpack(wv[r, u], e) * xf
        for r in range(wrows):
            acc[r] = lane_sum(xchg, acc[r])
        if lane == 0:
            for r in range(rows):
                if r0 + r < outs:
                    if silu:  # the projection's outputs rounded as stored, then SiluMul's
                        gate = load(store(acc[r]))
                        out[r0 + r] = store(silu_act(gate) * load(store(acc[rows + r])))
                    else:
                        out[r0 + r] = store(acc[r])

    params = (
        Param("out0", dtype, 1),
        Param("out1", dtype, 1),
        *(Param(f"in{i}", "int64", 1) for i in range(4)),
    )
    name = kernel_name("norm_gemv", k, n, op.eps, op.act, dtype, WARPS, UNROLL, rows)
    grid = (cdiv(outs, WARPS * rows),)
    return Kernel(name, norm_gemv, params, (nt,), lambda s: grid, when)


@kernel_for(NormLinear)
def build_norm_linear(op: NormLinear, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, res, g, w = inputs
    if len({x.dtype, res.dtype, g.dtype, w.dtype}) != 1:
        raise ValueError(f"NormLinear kernels need one dtype, got {inputs}")
    if x.shape != res.shape:
        raise ValueError(f"NormLinear kernels need equal shapes, got {x} and {res}")
    dtype, k, n = x.dtype, x.shape[-1], w.shape[0]
    gemv = gemv_supported(x)
    rows = lambda s: num_rows(x, s)  # noqa: E731
    more = (lambda s: rows(s) != 1) if gemv else None
    (norm,) = build_add_rmsnorm(AddRMSNorm(op.eps), (x, res, g), consts).kernels
    norm = _rebind(norm, {"out0": "normed"}, more)
    scratch = [Scratch("normed", dtype, lambda s: (rows(s), k))]
    if op.act == "silu_mul":
        scratch.append(Scratch("gate_up", dtype, lambda s: (rows(s), n)))
        gate = TensorType((*x.shape[:-1], n // 2), dtype)
        act = _rebind(silu_mul_kernel(gate, dtype, merged=True), {}, more)
        steps = (norm, Gemm("gate_up", "normed", "in3", more), act)
    else:
        steps = (norm, Gemm("out0", "normed", "in3", more))
    if gemv:
        steps = (_gemv(op, x, w, consts, lambda s: rows(s) == 1), *steps)
    return OpKernels(steps, tuple(scratch))


def _rebind(kernel: Kernel, names: dict[str, str], when) -> Kernel:
    """The kernel with its params bound to other names, launched when `when` holds."""
    params = tuple(replace(p, name=names.get(p.name, p.name)) for p in kernel.params)
    return replace(kernel, params=params, when=when)
