"""SiluMul: silu(gate) * up, one thread per output element of [rows, width].

gate and up may be strided views (the two halves of a merged gate/up projection): they are
read in place, not copied first."""

import math

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
from ir.ops import SiluMul
from ir.types import TensorType, promote

THREADS = 256


@kernel_for(SiluMul)
def build_silu_mul(op: SiluMul, inputs: tuple[TensorType, ...], consts: BuildConstants):
    gate, up = inputs
    if gate.shape != up.shape:
        raise ValueError(f"SiluMul kernel needs equal shapes, got {gate} and {up}")
    out_dtype = promote(gate.dtype, up.dtype)
    load_g, store_g = LOAD[gate.dtype], STORE[gate.dtype]
    load_u, store_out = LOAD[up.dtype], STORE[out_dtype]

    width = gate.shape[-1]

    @cuda.jit
    def silu_mul(out, gate, up):
        row, i = cuda.blockIdx.x, cuda.blockIdx.y * THREADS + cuda.threadIdx.x
        if i < width:
            g = load_g(gate[row, i])
            # torch rounds silu(gate) to gate's dtype before the product
            act = load_g(store_g(g / (float32(1.0) + math.exp(-g))))
            out[row, i] = store_out(act * load_u(up[row, i]))

    params = (
        Param("out0", out_dtype, 2),
        Param("in0", gate.dtype, 2, "A"),
        Param("in1", up.dtype, 2, "A"),
    )
    name = kernel_name("silu_mul", width, gate.dtype, up.dtype)
    grid = lambda s: (num_rows(gate, s), cdiv(width, THREADS))  # noqa: E731
    return OpKernels((Kernel(name, silu_mul, params, (THREADS,), grid),))
