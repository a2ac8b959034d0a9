"""SiluMul: silu(gate) * up over [rows, width].

A block covers THREADS x COLUMNS columns of one row; thread i takes columns i, i + THREADS,
... (a warp's loads are contiguous) and loads every gate and up element of them before it
computes and stores any, so that 2 x COLUMNS loads are in flight at once. One row still
spreads over width / COLUMNS threads.

gate and up may be strided views (the two halves of a merged gate/up projection): they are
read in place, not copied first. The merged variant takes the projection's output itself,
[rows, 2 x width], gate first."""

import math

import numpy as np

from codegen.cuda.dtypes import LOAD, STORE
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
from ir.ops import SiluMul
from ir.types import TensorType, promote

THREADS = 8 if CUDASIM else 128
COLUMNS = 4  # a thread's elements


def silu_rounded(dtype: str):
    """Device function: silu(x) of a float32 x, rounded to `dtype` as torch rounds it before
    the product, back as float32."""
    load, store = LOAD[dtype], STORE[dtype]

    @cuda.jit(device=True)
    def silu(x):
        return load(store(x / (float32(1.0) + math.exp(-x))))

    return silu


@kernel_for(SiluMul)
def build_silu_mul(op: SiluMul, inputs: tuple[TensorType, ...], consts: BuildConstants):
    gate, up = inputs
    if gate.shape != up.shape:
        raise ValueError(f"SiluMul kernel needs equal shapes, got {gate} and {up}")
    return OpKernels((silu_mul_kernel(gate, up.dtype, merged=False),))


def silu_mul_kernel(gate: TensorType, up_dtype: str, merged: bool) -> Kernel:
    """out0 = silu(gate) * up over gate's rows: gate and up are in0 and in1, or (merged) the
    two halves of each row of one [rows, 2 x width] tensor, "gate_up" (gate first)."""
    width = gate.shape[-1]
    out_dtype = promote(gate.dtype, up_dtype)
    load_g, load_u, store_out = LOAD[gate.dtype], LOAD[up_dtype], STORE[out_dtype]
    silu = silu_rounded(gate.dtype)
    nt, per = THREADS, COLUMNS
    U_NT, U_SPAN, U_WIDTH = (np.uint32(n) for n in (nt, nt * per, width))
    U_UP = U_WIDTH if merged else np.uint32(0)  # up's first column in its array

    @cuda.jit
    def silu_mul(out, gate, up):
        row = uint32(cuda.blockIdx.x)
        col = uint32(cuda.blockIdx.y) * U_SPAN + uint32(cuda.threadIdx.x)
        gs = cuda.local.array(per, float32)
        us = cuda.local.array(per, float32)
        for j in range(per):  # every load first
            i = col + uint32(j) * U_NT
            if i < U_WIDTH:
                gs[j], us[j] = load_g(gate[row, i]), load_u(up[row, i + U_UP])
        for j in range(per):
            i = col + uint32(j) * U_NT
            if i < U_WIDTH:
                out[row, i] = store_out(silu(gs[j]) * us[j])

    gate_name, up_name = ("gate_up", "gate_up") if merged else ("in0", "in1")
    params = (
        Param("out0", out_dtype, 2),
        Param(gate_name, gate.dtype, 2, "A"),
        Param(up_name, up_dtype, 2, "A"),
    )
    name = kernel_name("silu_mul", width, gate.dtype, up_dtype, nt, per, merged)
    grid = lambda s: (num_rows(gate, s), cdiv(width, nt * per))  # noqa: E731
    return Kernel(name, silu_mul, params, (nt,), grid)
