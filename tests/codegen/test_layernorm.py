"""LayerNorm kernels against the reference, under the simulator and on a GPU."""

import pytest
import torch
from kernel_harness import FLOATS, assert_matches, gpu_test, poisoned, rand, run_kernels, typed

from codegen.registry import build_kernels
from ir.ops import LayerNorm
from ir.reference import TORCH_DTYPES, RefContext, run_op
from ir.types import TensorType


def run_layernorm(tokens, hidden, dtype, w_dtype, bias=True, device="cpu", offset=0.0):
    """(kernel output, reference output) for x of [1, tokens, hidden] around `offset`; the
    output has x's dtype (float32 throughout, rounded once), poisoned before the launch."""
    x = (rand(1, tokens, hidden, device=device) * 3 + offset).to(TORCH_DTYPES[dtype])
    w = rand(hidden, dtype=w_dtype, device=device)
    b = rand(hidden, dtype=w_dtype, device=device) if bias else None
    out = poisoned(x.shape, dtype, device)
    op = LayerNorm(eps=1e-5)
    inputs = [x, w, *([b] if bias else [])]
    run_kernels(op, inputs, [out], {"T": tokens}, (typed(x, {1: "T"}), *map(typed, inputs[1:])))
    (expected,) = run_op(op, RefContext({"T": tokens}), *(t.cpu() for t in inputs))
    return out, expected


def check_layernorm(*args, **kwargs):
    """Within the tolerance of x's dtype (the harness's table)."""
    assert_matches(*run_layernorm(*args, **kwargs))


def check_far_from_zero(tokens, hidden, device="cpu"):
    """float32 rows around 1000 with a spread of 3. Their mean is off by an ulp or a few of
    1000 (6e-5 each) in any order of summation, the reference's too, and so is every output
    (times the weight): kernel and reference differ by a few 1e-4 (measured: at most 1.8e-4
    over 48 rows of 1000), within 1e-3.
    The variance as E[x^2] - mean^2 would cancel 1e6 against 1e6 in ulps of 0.06 and miss
    by about 5e-2."""
    out, expected = run_layernorm(tokens, hidden, "float32", "float32", device=device, offset=1e3)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", FLOATS)
def test_layernorm(dtype):
    # rows of 40 take 16 threads (the simulator's) with three elements each, the third of
    # most of them past the end; one block a row
    check_layernorm(3, 40, dtype, dtype)


def test_layernorm_without_bias_and_mixed_dtypes():
    # hidden 70 over 32 threads: only 6 threads hold a third element
    check_layernorm(2, 70, "bfloat16", "float32", bias=False)


def test_layernorm_far_from_zero():
    check_far_from_zero(2, 40)


def test_rows_wider_than_the_registers_stay_torch_ops():
    x, w = TensorType((1, "T", 16384), "bfloat16"), TensorType((16384,), "bfloat16")
    with pytest.raises(ValueError, match="rows of 16384"):
        build_kernels(LayerNorm(1e-5), (x, w, w))


@gpu_test
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("hidden", [1000, 2560, 4099, 8192])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_layernorm_gpu(dtype, hidden, bias):
    check_layernorm(77, hidden, dtype, dtype, bias=bias, device="cuda")


@gpu_test
def test_layernorm_mixed_and_far_from_zero_gpu():
    check_layernorm(33, 2047, "bfloat16", "float32", device="cuda")
    check_far_from_zero(33, 2047, device="cuda")
