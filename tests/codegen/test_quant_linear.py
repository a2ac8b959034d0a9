"""QuantLinear kernels (the few-rows dequant GEMV; dequant + cuBLAS + bias for more rows)
against the reference, under the simulator (GPU shapes: tests/gpu/test_quant_linear_cuda.py).

Tolerances (kernel_harness.TOLERANCE): the general path rounds the dequantized weight to x's
dtype as the reference does, the GEMV keeps it in float32 (one rounding less); both sum in
float32 in other orders and, on the general path with a bias, round once more. float32: 1e-5
relative. float16 2e-3, bfloat16 1.6e-2 relative: two ulps of the output dtype (2^-10, 2^-7
relative an ulp), with as much absolute for results near 0. The fp8 decode is checked exactly."""

import pytest
import torch
from kernel_harness import FLOATS, assert_matches, launch_kernels, poisoned, rand, typed

from codegen.cuda.quant_linear import gemv_buckets
from codegen.registry import BuildConstants, Gemm, build_kernels
from ir.ops import QuantLinear
from ir.quant import dequantize, quantize
from ir.reference import TORCH_DTYPES, RefContext, run_op
from ir.types import TensorType

FEW = BuildConstants(quant_gemv_rows=3)  # 1 and 3 rows: the GEMV; 4 and more: dequant + cuBLAS
N = 5  # odd; under the simulator (2 warps of 2 rows a block) the last block's first warp is
# partly past the end, its second wholly


def run(op, x, packed, bias=None, consts=FEW, **scratch):
    """The op's kernels on a poisoned output (and any scratch given): (kernels, out, expected)."""
    inputs = [x, *packed, *([] if bias is None else [bias])]
    tokens, dtype = x.shape[1], typed(x).dtype
    out = poisoned((*x.shape[:-1], packed[0].shape[0]), dtype)
    kernels = build_kernels(op, (typed(x, {1: "T"}), *(typed(t) for t in inputs[1:])), consts)
    tensors = {f"in{i}": t for i, t in enumerate(inputs)} | {"out0": out, **scratch}
    launch_kernels(kernels, {"T": tokens}, tensors)
    (expected,) = run_op(op, RefContext({"T": tokens}), *inputs)
    return kernels, out, expected


def ran(kernels, tokens):
    """The steps launched at this many tokens: generated kernels by family, "gemm"."""
    steps = kernels.steps({"T": tokens})
    return ["gemm" if isinstance(k, Gemm) else k.name.rsplit("_", 1)[0] for k in steps]


# int4: groups of 8 over 48 inputs (6 groups of one word), of 16 over 64 (4 groups of two
# words); fp8: 48 inputs as int64 words (8 bytes), 44 as int32 words (4 bytes)
CASES = [("int4", 8, 48), ("int4", 16, 64), ("fp8", 0, 48), ("fp8", 0, 44)]


@pytest.mark.parametrize("fmt,group,k", CASES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quant_linear_matches_the_reference(fmt, group, k, dtype):
    op = QuantLinear(fmt, group)
    packed = quantize(rand(N, k, dtype=dtype) * k**-0.5, fmt, group)
    bias = rand(N, dtype=dtype)
    for tokens, with_bias, steps in (
        (1, False, ["quant_gemv"]),
        (3, True, ["quant_gemv"]),
        (5, True, ["dequant", "gemm", "bias_add"]),
        (4, False, ["dequant", "gemm"]),
    ):
        x = rand(1, tokens, k, dtype=dtype)
        kernels, out, expected = run(op, x, packed, bias if with_bias else None)
        assert_matches(out, expected)
        assert ran(kernels, tokens) == steps


E4M3 = torch.arange(256, dtype=torch.uint8)  # every byte
FINITE = E4M3[(E4M3 & 0x7F) != 0x7F]  # all but e4m3fn's two NaNs, 0x7F and 0xFF


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("k", [256, 260])  # int64 words; int32 words (the last 4 bytes zero)
def test_fp8_decodes_every_byte_exactly(dtype, k):
    # one weight row holding every code at scale 1, dequantized (the general path's kernel)
    # into a scratch buffer read back: every e4m3 value is exact in each dtype
    codes = torch.cat([E4M3, torch.zeros(k - 256, dtype=torch.uint8)])[None]
    packed = (codes.view(torch.float8_e4m3fn), torch.ones(1))
    weight = poisoned((1, k), dtype)
    x = rand(1, 4, k, dtype=dtype)
    run(QuantLinear("fp8"), x, packed, weight=weight)
    expected = codes.view(torch.float8_e4m3fn).float().to(TORCH_DTYPES[dtype])
    torch.testing.assert_close(weight, expected, atol=0, rtol=0, equal_nan=True)
    assert weight[0, :256][(E4M3 & 0x7F) == 0x7F].isnan().all()


def test_fp8_gemv_over_every_finite_code():
    # the GEMV decodes the same way: 8 rows of 32 codes (0x00..0xFE but the NaN), per-row scales
    codes = torch.cat([FINITE, FINITE[:2]]).view(8, 32)
    packed = (codes.view(torch.float8_e4m3fn), torch.rand(8) / 448 + 1e-3)
    for dtype in FLOATS:
        x = rand(1, 2, 32, dtype=dtype)
        kernels, out, expected = run(QuantLinear("fp8"), x, packed)
        assert ran(kernels, 2) == ["quant_gemv"]
        assert_matches(out, expected)


def test_fp8_width_not_a_multiple_of_4_has_no_kernel():
    # a ValueError: kernel_plan leaves the node a torch op
    x, w = TensorType((1, "T", 42), "bfloat16"), TensorType((8, 42), "float8_e4m3fn")
    with pytest.raises(ValueError, match="4-byte words"):
        build_kernels(QuantLinear("fp8"), (x, w, TensorType((8,), "float32")))


def test_no_gemv_at_zero_rows_and_names_hash_the_constants():
    x = TensorType((1, "T", 64), "bfloat16")

    def names(group, consts=BuildConstants()):  # noqa: B008
        g = TensorType((8, 64 // group), "bfloat16")
        types = (x, TensorType((8, 8), "int32"), g, g)
        return [k.name for k in build_kernels(QuantLinear("int4", group), types, consts).generated]

    assert [n.rsplit("_", 1)[0] for n in names(16)] == ["quant_gemv"] * 4 + ["dequant"]
    assert not set(names(16)) & set(names(32))
    assert names(16, BuildConstants(quant_gemv_rows=0)) == names(16)[4:]
    assert gemv_buckets(8) == [1, 2, 4, 8] and gemv_buckets(3) == [1, 2, 3]
    assert gemv_buckets(0) == []


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int4_sums_of_exact_products_match_bit_for_bit(dtype):
    # x of -1, 0 and 1: each row's sum of weights (at most 13 significant bits, 4 bits of (q -
    # zero) times a scale, scales within a few powers of two) is exact in float32, so each
    # path's outputs are known exactly: the GEMV's from the float32 weights, the general
    # path's from the weights rounded to the dtype (the reference's)
    op = QuantLinear("int4", 8)
    packed = quantize(rand(N, 48, dtype=dtype), "int4", 8)
    exact = dequantize("int4", 8, *packed, torch.float32)
    for tokens in (3, 5):
        x = torch.randint(-1, 2, (1, tokens, 48)).to(TORCH_DTYPES[dtype])
        kernels, out, expected = run(op, x, packed)
        if ran(kernels, tokens)[0] == "quant_gemv":
            expected = torch.nn.functional.linear(x.float(), exact).to(x.dtype)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
