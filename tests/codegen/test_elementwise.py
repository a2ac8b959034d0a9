"""FusedElementwise: kernels generated from expression trees, against the reference."""

import pytest
import torch
from kernel_harness import FLOATS, assert_matches, gpu_test, poisoned, rand, run_kernels, typed

from codegen.cuda.elementwise import generate_source
from ir.ops import BINARY_FNS, UNARY_FNS, FusedElementwise
from ir.reference import RefContext, run_op

X, Y = ("arg", 0), ("arg", 1)
POSITIVE_X = ("add", ("mul", X, X), ("const", 0.25))  # domain of sqrt, rsqrt, pow's base


def check(expr, inputs, out_dtype, symbolic, sizes, device="cpu", like=None):
    op = FusedElementwise(expr, out_dtype)
    types = tuple(typed(t, s) for t, s in zip(inputs, symbolic, strict=True))
    (expected,) = run_op(op, RefContext(sizes), *(t.cpu() for t in inputs))
    out = poisoned(tuple(expected.shape), out_dtype, device)
    run_kernels(op, inputs, [out], sizes, types)
    assert_matches(out, expected, like=like)


@pytest.mark.parametrize("fn", UNARY_FNS)
def test_unary(fn):
    arg = POSITIVE_X if fn in ("sqrt", "rsqrt") else X
    x = rand(1, 3, 8) * 2
    check((fn, arg), [x], "float32", [{1: "T"}], {"T": 3})


@pytest.mark.parametrize("fn", BINARY_FNS)
def test_binary(fn):
    lhs = POSITIVE_X if fn == "pow" else X
    x, y = rand(1, 3, 8), rand(1, 3, 8)
    if fn == "div":
        y = y.sign() * (y.abs() + 0.5)  # keep quotients finite
    check((fn, lhs, Y), [x, y], "float32", [{1: "T"}, {1: "T"}], {"T": 3})


@pytest.mark.parametrize("dtype", FLOATS)
def test_broadcast_casts_and_integer_inputs(dtype):
    # gelu(x) * w + positions, rounded through bf16 midway: [1, T, 24] x [24] x [T, 1] int64
    x, w = rand(1, 5, 24, dtype=dtype), rand(24)
    positions = torch.arange(5, dtype=torch.int64)[:, None]
    expr = ("add", ("cast", "bfloat16", ("mul", ("gelu", X), Y)), ("arg", 2))
    # the device's erf may differ from torch's in the last float32 bit, and the cast can turn
    # that into one bfloat16 ulp of the intermediate: bfloat16's tolerance for every dtype
    check(expr, [x, w, positions], dtype, [{1: "T"}, {}, {0: "T"}], {"T": 5}, like="bfloat16")


def test_strided_input_view():
    base = rand(4, 2, 10)  # [T, 2, 10] viewed as [2, T, 5]: strided, offset
    x = base.transpose(0, 1)[:, :, 3:8]
    check(("mul", ("silu", X), ("const", 3.0)), [x], "float16", [{1: "T"}], {"T": 4})


def test_shared_subtrees_are_computed_once():
    silu = ("silu", ("mul", X, ("const", 2.0)))
    op = FusedElementwise(("add", ("mul", silu, silu), silu), "float32")
    src, _ = generate_source(op, (typed(rand(1, 3, 8), {1: "T"}),))
    assert src.count("math.exp") == 1
    assert src.count("load0(") == 1


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_elementwise_gpu(dtype):
    x = rand(1001, 2, 800, dtype=dtype, device="cuda").transpose(0, 1)[:1, :, 20:797]  # strided
    w = rand(777, device="cuda")
    positions = torch.arange(1001, dtype=torch.int64, device="cuda")[:, None]
    expr = ("add", ("cast", "float16", ("mul", ("gelu_tanh", X), Y)), ("sin", ("arg", 2)))
    sizes = {"T": 1001}
    check(expr, [x, w, positions], dtype, [{1: "T"}, {}, {0: "T"}], sizes, "cuda", like="bfloat16")
