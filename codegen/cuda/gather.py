"""GatherLastTokens: rows of x at `indices` along one dimension (logits of last tokens)."""

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
from ir.ops import GatherLastTokens
from ir.types import TensorType, normalize_dim


@kernel_for(GatherLastTokens)
def build_gather(op: GatherLastTokens, inputs: tuple[TensorType, ...], consts: BuildConstants):
    x, indices = inputs
    dim, inner = normalize_dim(op.dim, x.rank), x.shape[-1]  # x [1, ..., T, inner]
    if dim != x.rank - 2 or any(d != 1 for d in x.shape[:dim]) or not isinstance(inner, int):
        raise ValueError(f"GatherLastTokens kernel needs x [1, T, n] gathered on T, got {x}")
    if indices.rank != 1:
        raise ValueError(f"GatherLastTokens kernel needs 1-D indices, got {indices}")
    nt = pow2_threads(inner, hi=256)

    @cuda.jit
    def gather(out, x, indices):
        b = cuda.blockIdx.x
        row = indices[b]
        for i in range(cuda.threadIdx.x, inner, nt):
            out[b, i] = x[row, i]

    params = (Param("out0", x.dtype, 2), Param("in0", x.dtype, 2), Param("in1", indices.dtype, 1))
    name = kernel_name("gather_last_tokens", inner, x.dtype, indices.dtype)
    grid = lambda s: (concrete(indices.shape, s)[0],)  # noqa: E731
    return OpKernels((Kernel(name, gather, params, (nt,), grid),))
