"""Embedding: one block per token copies its row of the table."""

import math

from codegen.cuda.blockops import pow2_threads
from codegen.numba_shim import cuda
from codegen.registry import (
    BuildConstants,
    Kernel,
    OpKernels,
    Param,
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
    nt = pow2_threads(hidden, hi=128)

    @cuda.jit
    def embedding(out, weight, ids):
        t = cuda.blockIdx.x
        row = ids[t]
        for i in range(cuda.threadIdx.x, hidden, nt):
            out[t, i] = weight[row, i]  # a copy: storage bits move unchanged, bf16 too

    params = (
        Param("out0", weight.dtype, 2),
        Param("in0", weight.dtype, 2),
        Param("in1", ids.dtype, 1),
    )
    name = kernel_name("embedding", hidden, weight.dtype, ids.dtype)
    grid = lambda s: (math.prod(concrete(ids.shape, s)),)  # noqa: E731
    return OpKernels((Kernel(name, embedding, params, (nt,), grid),))
