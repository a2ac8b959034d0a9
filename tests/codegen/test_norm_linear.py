"""NormLinear kernels (the one-token GEMV with its norm, the general AddRMSNorm + cuBLAS +
SiluMul path) against the reference, under the simulator and on a GPU."""

import pytest
from kernel_harness import FLOATS, assert_matches, gpu_test, poisoned, rand, run_kernels, typed

from codegen.cuda.norm_linear import WARPS, gemv_supported, rows_per_warp
from codegen.registry import BuildConstants, Gemm, build_kernels
from ir.ops import NormLinear
from ir.reference import RefContext, run_op
from ir.types import TensorType


def check(tokens, k, n, dtype, act=None, device="cpu", consts=BuildConstants()):  # noqa: B008
    shape = (1, tokens, k)
    x, res = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    g = rand(k, dtype=dtype, device=device)
    w = rand(n, k, dtype=dtype, device=device) * k**-0.5
    out = poisoned((1, tokens, n // 2 if act else n), dtype, device)
    s = poisoned(shape, dtype, device)
    op = NormLinear(1e-6, act)
    types = (typed(x, {1: "T"}), typed(res, {1: "T"}), typed(g), typed(w))
    kernels = run_kernels(op, [x, res, g, w], [out, s], {"T": tokens}, types, consts)
    cpu = [t.cpu() for t in (x, res, g, w)]
    expected, expected_s = run_op(op, RefContext({"T": tokens}), *cpu)
    assert_matches(s, expected_s)
    assert_matches(out, expected)
    return kernels


def ran(kernels, tokens):
    """The steps launched at this many tokens: generated kernels by family, "gemm"."""
    steps = kernels.steps({"T": tokens})
    return ["gemm" if isinstance(k, Gemm) else k.name.rsplit("_", 1)[0] for k in steps]


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("act", [None, "silu_mul"])
def test_one_token_runs_the_fused_gemv(dtype, act):
    # k = 40: 10 words of 16-bit elements (20 of fp32), fewer than a warp's lanes; the last
    # block's rows partly past the end (6 rows, or 5 gate/up pairs, in blocks of 8 or 4)
    kernels = check(1, 40, 10 if act else 6, dtype, act)
    assert ran(kernels, 1) == ["norm_gemv"]
    assert not {"normed", "gate_up"} & kernels.bound({"T": 1})  # no scratch allocated


@pytest.mark.parametrize("rows", [2, 3, 4])
def test_plain_projection_at_each_rows_per_warp(rows):
    # 13 rows: the last block's warps partly (or wholly) past the end at every geometry
    blocks = {r: -(-13 // (WARPS * r)) for r in (2, 3, 4)}
    consts = BuildConstants(gemv_blocks=blocks[rows] if rows < 4 else 0)
    assert rows_per_warp(None, 13, consts) == rows
    assert ran(check(1, 40, 13, "float32", consts=consts), 1) == ["norm_gemv"]


@pytest.mark.parametrize("act", [None, "silu_mul"])
def test_more_tokens_run_norm_gemm_and_silu(act):
    kernels = check(3, 24, 12, "bfloat16", act)
    expected = ["add_rmsnorm", "gemm", *(["silu_mul"] if act else [])]
    assert ran(kernels, 3) == expected
    assert {"normed", *(["gate_up"] if act else [])} <= kernels.bound({"T": 3})


def test_width_without_whole_words_has_no_gemv():
    # 42 bf16 elements are not whole 8-byte words: one token takes the general path too
    x = typed(rand(1, 1, 42, dtype="bfloat16"), {1: "T"})
    assert not gemv_supported(x)
    kernels = check(1, 42, 8, "bfloat16")
    assert ran(kernels, 1) == ["add_rmsnorm", "gemm"]


def test_mixed_dtypes_are_refused():
    x, bf = TensorType((1, "T", 8), "bfloat16"), "bfloat16"
    types = (x, x, TensorType((8,), "float32"), TensorType((4, 8), bf))
    with pytest.raises(ValueError, match="one dtype"):
        build_kernels(NormLinear(1e-6), types)


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("act", [None, "silu_mul"])
@pytest.mark.parametrize("tokens", [1, 77])
def test_norm_linear_gpu(dtype, act, tokens):
    check(tokens, 1000, 2 * 1031, dtype, act, device="cuda")  # odd rows, a partial word run
    check(tokens, 4096, 6144 if act is None else 2 * 14336, dtype, act, device="cuda")
    if act is None:  # 4 rows a warp (the other shapes take 2 and 3)
        check(tokens, 1000, 1031, dtype, device="cuda", consts=BuildConstants(gemv_blocks=0))
