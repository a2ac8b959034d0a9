"""RMSNorm and AddRMSNorm (residual add + norm, both outputs written).

A row takes a power of two of threads, each with 4+ elements (i, i + threads, ...); a block
holds as many rows as fill BLOCK_THREADS, so short rows (per-head norms: T x heads rows of
head_dim) do not each cost a block of one warp. A row's sum of squares is a butterfly over
its threads, through shared memory at strides of a warp or more and by shuffles below, in the
order of a tree (stride threads/2 first): every thread ends with the same sum. Rows past the
end load zeros and store nothing, but join every barrier.
"""

import math

import numpy as np

from codegen.cuda.blockops import pow2_threads
from codegen.cuda.dtypes import LOAD, STORE
from codegen.cuda.warp import shfl_xor
from codegen.numba_shim import CUDASIM, cuda, float32, uint32
from codegen.registry import (
    BuildConstants,
    Kernel,
    OpKernels,
    Param,
    cdiv,
    kernel_for,
    kernel_name,
    num_rows,
)
from ir.ops import AddRMSNorm, RMSNorm
from ir.types import TensorType, promote

# threads a block of short rows fills; below SHUFFLE the sum goes through shuffles (the
# simulator's are shared memory and block barriers: small, to run both paths on short rows)
BLOCK_THREADS = 64 if CUDASIM else 128
SHUFFLE = 4 if CUDASIM else 32


def row_sum(nt: int):
    """Device function: the sum of `value` over the nt (a power of two) threads of a row."""

    @cuda.jit(device=True)
    def summed(buf, value):
        """buf: a shared array of blockDim.x; rows are aligned runs of nt threads."""
        tid = cuda.threadIdx.x
        stride = nt // 2
        while stride >= SHUFFLE:
            buf[tid] = value
            cuda.syncthreads()
            value += buf[tid ^ stride]
            cuda.syncthreads()  # read before the next level writes
            stride //= 2
        while stride > 0:
            value += shfl_xor(buf, value, stride)
            stride //= 2
        return value

    return summed


def _geometry(hidden: int) -> tuple[int, int, int]:
    """(threads a row, elements a thread, rows a block)."""
    nt = pow2_threads(cdiv(hidden, 4), hi=1024)  # short per-thread chains: 4+ elements each
    return nt, cdiv(hidden, nt), max(1, BLOCK_THREADS // nt)


def scaled(x_dtype: str, w_dtype: str, out_dtype: str):
    """Device function: weight * x * rstd with the reference's roundings (x * rstd to x's
    dtype first, the product to out's), from float32 values; returns the stored element."""
    load_x, store_x, store_out = LOAD[x_dtype], STORE[x_dtype], STORE[out_dtype]

    @cuda.jit(device=True)
    def scale(w, x, rstd):
        return store_out(w * load_x(store_x(x * rstd)))

    return scale


def _normalizer(hidden: int, eps: float, x_dtype: str, w_dtype: str, out_dtype: str):
    """Device function writing one normalized row from the fp32 values a thread holds."""
    nt, ept, _ = _geometry(hidden)
    inv_hidden, eps32 = np.float32(1.0 / hidden), np.float32(eps)
    load_w, scale = LOAD[w_dtype], scaled(x_dtype, w_dtype, out_dtype)
    total = row_sum(nt)

    @cuda.jit(device=True)
    def write_normalized(out, w, row, live, lane, vals, buf):
        """vals: this thread's elements of the row, zero past its end (and on dead rows)."""
        ws = cuda.local.array(ept, float32)
        sumsq = float32(0.0)
        for j in range(ept):
            i = lane + uint32(j * nt)
            ws[j] = load_w(w[i]) if i < hidden else float32(0.0)  # in flight during the sum
            sumsq += vals[j] * vals[j]
        rstd = float32(1.0) / math.sqrt(total(buf, sumsq) * inv_hidden + eps32)
        if live:
            for j in range(ept):
                i = lane + uint32(j * nt)
                if i < hidden:
                    out[row, i] = scale(ws[j], vals[j], rstd)

    return write_normalized


def _place(nt: int, rows_per_block: int):
    """Device function: (row, live, lane) of this thread; live: row < rows."""
    U_LANE, U_SHIFT = np.uint32(nt - 1), np.uint32(nt.bit_length() - 1)
    U_RPB = np.uint32(rows_per_block)

    @cuda.jit(device=True)
    def place(rows):
        tid = uint32(cuda.threadIdx.x)
        row = uint32(uint32(cuda.blockIdx.x) * U_RPB + (tid >> U_SHIFT))
        return row, row < uint32(rows), tid & U_LANE

    return place


@kernel_for(RMSNorm)
def build_rmsnorm(op: RMSNorm, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, w = inputs
    hidden, out_dtype = x.shape[-1], promote(x.dtype, w.dtype)
    nt, ept, rpb = _geometry(hidden)
    block = nt * rpb
    write_normalized = _normalizer(hidden, op.eps, x.dtype, w.dtype, out_dtype)
    place = _place(nt, rpb)
    load_x = LOAD[x.dtype]

    @cuda.jit
    def rmsnorm(out, x, w):
        row, live, lane = place(x.shape[0])
        buf = cuda.shared.array(block, float32)
        vals = cuda.local.array(ept, float32)
        for j in range(ept):
            i = lane + uint32(j * nt)
            vals[j] = load_x(x[row, i]) if live and i < hidden else float32(0.0)
        write_normalized(out, w, row, live, lane, vals, buf)

    # x may be a strided view (per-head norms of a slice of a merged projection)
    params = (Param("out0", out_dtype, 2), Param("in0", x.dtype, 2, "A"), Param("in1", w.dtype, 1))
    name = kernel_name("rmsnorm", hidden, op.eps, x.dtype, w.dtype, rpb, SHUFFLE)
    grid = lambda s: (cdiv(num_rows(x, s), rpb),)  # noqa: E731
    return OpKernels((Kernel(name, rmsnorm, params, (block,), grid),))


@kernel_for(AddRMSNorm)
def build_add_rmsnorm(op: AddRMSNorm, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, res, w = inputs
    if x.shape != res.shape:
        raise ValueError(f"AddRMSNorm kernel needs equal shapes, got {x} and {res}")
    hidden, s_dtype = x.shape[-1], promote(x.dtype, res.dtype)
    out_dtype = promote(s_dtype, w.dtype)
    nt, ept, rpb = _geometry(hidden)
    block = nt * rpb
    write_normalized = _normalizer(hidden, op.eps, s_dtype, w.dtype, out_dtype)
    place = _place(nt, rpb)
    load_x, load_r = LOAD[x.dtype], LOAD[res.dtype]
    load_s, store_s = LOAD[s_dtype], STORE[s_dtype]

    # Every load is issued before the first store (loads overlap instead of waiting on each
    # other); each thread reads res[row, i] before it writes s_out[row, i], so s_out may
    # alias res.
    @cuda.jit
    def add_rmsnorm(out, s_out, x, res, w):
        row, live, lane = place(x.shape[0])
        buf = cuda.shared.array(block, float32)
        xs = cuda.local.array(ept, float32)
        vals = cuda.local.array(ept, float32)
        for j in range(ept):
            i = lane + uint32(j * nt)
            xs[j], vals[j] = float32(0.0), float32(0.0)
            if live and i < hidden:
                xs[j], vals[j] = load_x(x[row, i]), load_r(res[row, i])
        for j in range(ept):
            i = lane + uint32(j * nt)
            if live and i < hidden:
                s = store_s(xs[j] + vals[j])
                s_out[row, i] = s
                vals[j] = load_s(s)
        write_normalized(out, w, row, live, lane, vals, buf)

    params = (
        Param("out0", out_dtype, 2),
        Param("out1", s_dtype, 2),
        Param("in0", x.dtype, 2),
        Param("in1", res.dtype, 2),
        Param("in2", w.dtype, 1),
    )
    name = kernel_name("add_rmsnorm", hidden, op.eps, x.dtype, res.dtype, w.dtype, rpb, SHUFFLE)
    grid = lambda s: (cdiv(num_rows(x, s), rpb),)  # noqa: E731
    return OpKernels((Kernel(name, add_rmsnorm, params, (block,), grid),))
