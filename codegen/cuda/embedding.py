"""Embedding: blocks of (token, column tile) copy the token's row of the table, one element per
thread, so that even one token spreads its row over many blocks."""

import math

from codegen.cuda.blockops import pow2_threads
from codegen.numba_shim import cuda
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
from ir.ops import Embedding
from ir.types import TensorType


@kernel_for(Embedding)
def build_embedding(op: Embedding, inputs: tuple[TensorType, ...], consts: BuildConstants):
    weight, ids = inputs
    hidden = weight.shape[1]
    nt = pow2_threads(hidden, hi=256)

    @cuda.jit
    def embedding(out, weight, ids):
        t, i = cuda.blockIdx.x, cuda.blockIdx.y * nt + cuda.threadIdx.x
        if i < hidden:
            out[t, i] = weight[ids[t], i]  # a copy: storage bits move unchanged, bf16 too

    params = (
        Param("out0", weight.dtype, 2),
        Param("in0", weight.dtype, 2),
        Param("in1", ids.dtype, 1),
    )
    name = kernel_name("embedding", hidden, weight.dtype, ids.dtype)
    grid = lambda s: (math.prod(concrete(ids.shape, s)), cdiv(hidden, nt))  # noqa: E731
    return OpKernels((Kernel(name, embedding, params, (nt,), grid),))
