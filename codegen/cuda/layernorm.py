"""LayerNorm: one block a row, its elements held in registers between the passes over them.

A row takes a power of two of threads, each with 4+ elements (i, i + threads, ...). The mean
is one block sum; the variance is a second one, of the squared deviations from that mean, not
E[x^2] - mean^2, which loses every digit when the mean is large against the spread. Both sums
are the butterfly of RMSNorm's kernel (every thread ends with the total) and run in float32;
the result is rounded once, to x's dtype, as the reference rounds it.
"""

import math

import numpy as np

from codegen.cuda.blockops import pow2_threads
from codegen.cuda.dtypes import LOAD, STORE
from codegen.cuda.rmsnorm import SHUFFLE, row_sum
from codegen.numba_shim import cuda, float32, uint32
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
from ir.ops import LayerNorm
from ir.types import TensorType

# elements a thread holds at the most: each takes three registers (x, weight, bias), and a
# block of 1024 threads has 64 a thread (rows of 8192: 48 registers; 16384 would need 80)
MAX_PER_THREAD = 8


def _geometry(hidden: int) -> tuple[int, int]:
    """(threads a row, elements a thread)."""
    nt = pow2_threads(cdiv(hidden, 4), hi=1024)  # short per-thread chains: 4+ elements each
    return nt, cdiv(hidden, nt)


def _normalizer(hidden: int, eps: float, x_dtype: str, w_dtype: str, b_dtype: str | None):
    """Device function normalizing row blockIdx.x of x into out; b is None without a bias
    (numba prunes the bias branches when it compiles that case)."""
    nt, ept = _geometry(hidden)
    inv_hidden, eps32 = np.float32(1.0 / hidden), np.float32(eps)
    load_x, load_w, store_out = LOAD[x_dtype], LOAD[w_dtype], STORE[x_dtype]
    load_b = LOAD[b_dtype or w_dtype]  # not called without a bias
    total = row_sum(nt)

    @cuda.jit(device=True)
    def normalize(out, x, w, b):
        row, lane = uint32(cuda.blockIdx.x), uint32(cuda.threadIdx.x)
        buf = cuda.shared.array(nt, float32)
        vals = cuda.local.array(ept, float32)
        ws = cuda.local.array(ept, float32)
        bs = cuda.local.array(ept, float32)
        s = float32(0.0)
        for j in range(ept):
            i = lane + uint32(j * nt)
            vals[j] = load_x(x[row, i]) if i < hidden else float32(0.0)
            s += vals[j]
        for j in range(ept):  # in flight during the sums
            i = lane + uint32(j * nt)
            ws[j] = load_w(w[i]) if i < hidden else float32(0.0)
            if b is not None:
                bs[j] = load_b(b[i]) if i < hidden else float32(0.0)
        mean = total(buf, s) * inv_hidden
        sq = float32(0.0)
        for j in range(ept):
            i = lane + uint32(j * nt)
            vals[j] = vals[j] - mean if i < hidden else float32(0.0)  # past the end: no term
            sq += vals[j] * vals[j]
        rstd = float32(1.0) / math.sqrt(total(buf, sq) * inv_hidden + eps32)
        for j in range(ept):
            i = lane + uint32(j * nt)
            if i < hidden:
                y = vals[j] * rstd * ws[j]
                if b is not None:
                    y += bs[j]
                out[row, i] = store_out(y)

    return normalize


@kernel_for(LayerNorm)
def build_layernorm(op: LayerNorm, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, w, *bias = inputs  # the plan drops an absent bias: inputs are (x, w) or (x, w, b)
    hidden = x.shape[-1]
    b_dtype = bias[0].dtype if bias else None
    nt, ept = _geometry(hidden)
    if ept > MAX_PER_THREAD:
        raise ValueError(f"LayerNorm kernel: rows of {hidden} exceed {nt * MAX_PER_THREAD}")
    normalize = _normalizer(hidden, op.eps, x.dtype, w.dtype, b_dtype)
    params = (Param("out0", x.dtype, 2), Param("in0", x.dtype, 2), Param("in1", w.dtype, 1))
    if bias:

        @cuda.jit
        def layernorm(out, x, w, b):
            normalize(out, x, w, b)

        params += (Param("in2", b_dtype, 1),)
    else:

        @cuda.jit
        def layernorm(out, x, w):
            normalize(out, x, w, None)

    name = kernel_name("layernorm", hidden, op.eps, x.dtype, w.dtype, b_dtype, nt, SHUFFLE)
    grid = lambda s: (num_rows(x, s),)  # noqa: E731
    return OpKernels((Kernel(name, layernorm, params, (nt,), grid),))
