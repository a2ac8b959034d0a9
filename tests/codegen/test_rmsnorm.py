"""RMSNorm and AddRMSNorm kernels against the reference, under the simulator and on a GPU."""

import pytest
from kernel_harness import FLOATS, assert_matches, gpu_test, poisoned, rand, run_kernels, typed

from ir.ops import AddRMSNorm, RMSNorm
from ir.reference import RefContext, run_op
from ir.types import promote


def check_rmsnorm(tokens, hidden, x_dtype, w_dtype, device="cpu", heads=None):
    """heads: x is [1, tokens, heads, hidden], a norm of each head (q/k norm)."""
    shape = (1, tokens, *((heads,) if heads else ()), hidden)
    x = rand(*shape, dtype=x_dtype, device=device) * 3
    w = rand(hidden, dtype=w_dtype, device=device)
    out = poisoned(shape, promote(x_dtype, w_dtype), device)
    op = RMSNorm(eps=1e-5)
    run_kernels(op, [x, w], [out], {"T": tokens}, (typed(x, {1: "T"}), typed(w)))
    (expected,) = run_op(op, RefContext({"T": tokens}), x.cpu(), w.cpu())
    assert_matches(out, expected)


def check_add_rmsnorm(shape, dtype, w_dtype, device="cpu"):
    x, res = rand(*shape, dtype=dtype, device=device), rand(*shape, dtype=dtype, device=device)
    w = rand(shape[-1], dtype=w_dtype, device=device)
    out, s = poisoned(shape, promote(dtype, w_dtype), device), poisoned(shape, dtype, device)
    op = AddRMSNorm(eps=1e-6)
    types = (typed(x, {1: "T"}), typed(res, {1: "T"}), typed(w))
    run_kernels(op, [x, res, w], [out, s], {"T": shape[1]}, types)
    expected, expected_s = run_op(op, RefContext({"T": shape[1]}), x.cpu(), res.cpu(), w.cpu())
    assert_matches(s, expected_s)
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_rmsnorm(dtype):
    # rows of 40 take 16 threads (the simulator's), 4 rows a block: 9 rows, 3 blocks
    check_rmsnorm(9, 40, dtype, dtype)


def test_rmsnorm_rows_of_heads():
    # q/k-norm shape: 7 tokens x 3 heads, 21 rows of 16 in blocks of 16 rows of 4 threads,
    # the second block mostly past the last row
    check_rmsnorm(7, 16, "bfloat16", "float32", heads=3)


def test_rmsnorm_mixed_dtypes_and_long_rows():
    # hidden 70 over 32 threads: three elements per thread, the last thread's partly empty
    check_rmsnorm(2, 70, "bfloat16", "float32")


@pytest.mark.parametrize("dtype", FLOATS)
def test_add_rmsnorm(dtype):
    check_add_rmsnorm((1, 3, 24), dtype, dtype)


def test_add_rmsnorm_rows_of_heads():
    # qk-norm shape: normalize each head's 16 values of [1, T, heads, 16]
    check_add_rmsnorm((1, 2, 3, 16), "float16", "float32")


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("hidden", [1000, 4099])
def test_rmsnorm_gpu(dtype, hidden):
    check_rmsnorm(77, hidden, dtype, dtype, device="cuda")
    check_add_rmsnorm((1, 77, hidden), dtype, dtype, device="cuda")


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_rmsnorm_rows_of_heads_gpu(dtype):
    check_rmsnorm(517, 128, dtype, dtype, device="cuda", heads=15)  # 4 rows a block of 128
