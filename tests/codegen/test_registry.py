"""The kernel registry: lookups, duplicate rejection, names that identify the code."""

import pytest
from kernel_harness import FLOATS

from codegen.registry import KERNEL_BUILDERS, build_kernels, kernel_for
from ir.ops import Embedding, Linear, PagedAttention, RMSNorm
from ir.types import TensorType


def test_duplicate_registration_is_rejected():
    with pytest.raises(ValueError, match="registered twice"):
        kernel_for(RMSNorm)(lambda op, inputs, consts: None)
    assert KERNEL_BUILDERS[(RMSNorm, "cuda")].__name__ == "build_rmsnorm"


def test_linear_has_no_kernel():  # a library GEMM (torch) runs it
    with pytest.raises(KeyError, match="no cuda kernel for Linear"):
        build_kernels(Linear(), (TensorType(("T", 8), "float32"), TensorType((4, 8), "float32")))


def norm_names(eps, hidden, dtype):
    x, w = TensorType((1, "T", hidden), dtype), TensorType((hidden,), dtype)
    return [k.name for k in build_kernels(RMSNorm(eps), (x, w)).kernels]


def test_names_change_with_every_constant():
    base = norm_names(1e-6, 24, "float32")
    assert norm_names(1e-6, 24, "float32") == base
    variants = [norm_names(1e-5, 24, "float32"), norm_names(1e-6, 40, "float32")]
    variants += [norm_names(1e-6, 24, d) for d in FLOATS[1:]]
    assert len({n for v in [base, *variants] for n in v}) == 5


def test_attention_layers_share_kernels():
    heads = (TensorType((1, "T", 4, 8), "float16"), *[TensorType((1, "T", 2, 8), "float16")] * 2)
    layer = [PagedAttention(i, 4, 2, 8, 0.3, layout="bthd") for i in range(2)]
    first, second = (build_kernels(op, heads) for op in layer)
    assert [k.name for k in first.kernels] == [k.name for k in second.kernels]


def test_attention_needs_bthd_layout():
    heads = (TensorType((1, 4, "T", 8), "float16"), *[TensorType((1, 2, "T", 8), "float16")] * 2)
    with pytest.raises(ValueError, match="bthd"):
        build_kernels(PagedAttention(0, 4, 2, 8, 0.3), heads)


def test_embedding_grid_covers_every_token():
    table, ids = TensorType((50, 24), "bfloat16"), TensorType((1, "T"), "int64")
    (kernel,) = build_kernels(Embedding(), (table, ids)).kernels
    tokens, tiles = kernel.grid({"T": 13})
    assert tokens == 13 and tiles * kernel.block[0] >= 24 > (tiles - 1) * kernel.block[0]
