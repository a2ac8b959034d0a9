"""SiluMul: silu(gate) * up, one thread per output element."""

import math

from codegen.cuda.dtypes import LOAD, STORE
from codegen.numba_shim import cuda, float32
from codegen.registry import (
    BuildConstants,
    Kernel,
    OpKernels,
    Param,
    cdiv,
    concrete,
    kernel_for,
    kernel_name,
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

    @cuda.jit
    def silu_mul(out, gate, up):
        i = cuda.grid(1)
        if i < out.shape[0]:
            g = load_g(gate[i])
            # torch rounds silu(gate) to gate's dtype before the product
            act = load_g(store_g(g / (float32(1.0) + math.exp(-g))))
            out[i] = store_out(act * load_u(up[i]))

    params = (Param("out0", out_dtype, 1), Param("in0", gate.dtype, 1), Param("in1", up.dtype, 1))
    name = kernel_name("silu_mul", gate.dtype, up.dtype)
    grid = lambda s: (cdiv(math.prod(concrete(gate.shape, s)), THREADS),)  # noqa: E731
    return OpKernels((Kernel(name, silu_mul, params, (THREADS,), grid),))
