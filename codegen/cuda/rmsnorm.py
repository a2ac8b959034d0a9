"""RMSNorm and AddRMSNorm (residual add + norm, both outputs written): one block per row."""

import math

import numpy as np

from codegen.cuda.blockops import block_sum, pow2_threads
from codegen.cuda.dtypes import LOAD, STORE
from codegen.numba_shim import cuda, float32
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


def _normalizer(hidden: int, eps: float, x_dtype: str, w_dtype: str, out_dtype: str):
    """Device function writing one normalized row from the fp32 values a thread holds."""
    nt = pow2_threads(cdiv(hidden, 4), hi=1024)  # short per-thread chains: 4+ elements each
    ept = cdiv(hidden, nt)  # elements per thread
    inv_hidden, eps32 = np.float32(1.0 / hidden), np.float32(eps)
    load_x, store_x = LOAD[x_dtype], STORE[x_dtype]
    load_w, store_out = LOAD[w_dtype], STORE[out_dtype]

    @cuda.jit(device=True)
    def write_normalized(out, w, row, vals, buf):
        """vals: this thread's elements of the row, zero past the end."""
        tid = cuda.threadIdx.x
        ws = cuda.local.array(ept, float32)
        sumsq = float32(0.0)
        for j in range(ept):
            i = tid + j * nt
            ws[j] = load_w(w[i]) if i < hidden else float32(0.0)  # in flight during the sum
            sumsq += vals[j] * vals[j]
        rstd = float32(1.0) / math.sqrt(block_sum(buf, sumsq) * inv_hidden + eps32)
        for j in range(ept):
            i = tid + j * nt
            if i < hidden:
                y = load_x(store_x(vals[j] * rstd))  # the reference rounds to x's dtype first
                out[row, i] = store_out(ws[j] * y)

    return write_normalized, nt, ept


@kernel_for(RMSNorm)
def build_rmsnorm(op: RMSNorm, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, w = inputs
    hidden, out_dtype = x.shape[-1], promote(x.dtype, w.dtype)
    write_normalized, nt, ept = _normalizer(hidden, op.eps, x.dtype, w.dtype, out_dtype)
    load_x = LOAD[x.dtype]

    @cuda.jit
    def rmsnorm(out, x, w):
        row, tid = cuda.blockIdx.x, cuda.threadIdx.x
        buf = cuda.shared.array(nt, float32)
        vals = cuda.local.array(ept, float32)
        for j in range(ept):
            i = tid + j * nt
            vals[j] = load_x(x[row, i]) if i < hidden else float32(0.0)
        write_normalized(out, w, row, vals, buf)

    # x may be a strided view (per-head norms of a slice of a merged projection)
    params = (Param("out0", out_dtype, 2), Param("in0", x.dtype, 2, "A"), Param("in1", w.dtype, 1))
    name = kernel_name("rmsnorm", hidden, op.eps, x.dtype, w.dtype)
    return OpKernels((Kernel(name, rmsnorm, params, (nt,), lambda s: (num_rows(x, s),)),))


@kernel_for(AddRMSNorm)
def build_add_rmsnorm(op: AddRMSNorm, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, res, w = inputs
    if x.shape != res.shape:
        raise ValueError(f"AddRMSNorm kernel needs equal shapes, got {x} and {res}")
    hidden, s_dtype = x.shape[-1], promote(x.dtype, res.dtype)
    out_dtype = promote(s_dtype, w.dtype)
    write_normalized, nt, ept = _normalizer(hidden, op.eps, s_dtype, w.dtype, out_dtype)
    load_x, load_r = LOAD[x.dtype], LOAD[res.dtype]
    load_s, store_s = LOAD[s_dtype], STORE[s_dtype]

    # Every load is issued before the first store (loads overlap instead of waiting on each
    # other); each thread reads res[row, i] before it writes s_out[row, i], so s_out may
    # alias res.
    @cuda.jit
    def add_rmsnorm(out, s_out, x, res, w):
        row, tid = cuda.blockIdx.x, cuda.threadIdx.x
        buf = cuda.shared.array(nt, float32)
        xs = cuda.local.array(ept, float32)
        vals = cuda.local.array(ept, float32)
        for j in range(ept):
            i = tid + j * nt
            xs[j], vals[j] = float32(0.0), float32(0.0)
            if i < hidden:
                xs[j], vals[j] = load_x(x[row, i]), load_r(res[row, i])
        for j in range(ept):
            i = tid + j * nt
            if i < hidden:
                s = store_s(xs[j] + vals[j])
                s_out[row, i] = s
                vals[j] = load_s(s)
        write_normalized(out, w, row, vals, buf)

    params = (
        Param("out0", out_dtype, 2),
        Param("out1", s_dtype, 2),
        Param("in0", x.dtype, 2),
        Param("in1", res.dtype, 2),
        Param("in2", w.dtype, 1),
    )
    name = kernel_name("add_rmsnorm", hidden, op.eps, x.dtype, res.dtype, w.dtype)
    return OpKernels((Kernel(name, add_rmsnorm, params, (nt,), lambda s: (num_rows(x, s),)),))
