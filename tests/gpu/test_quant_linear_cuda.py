"""QuantLinear kernels at Llama-3.1-8B's projection shapes on the GPU (QKV 4096 -> 6144 with a
bias, down 14336 -> 4096 without): the fused dequant GEMV up to quant_gemv_rows rows, dequant +
cuBLAS (+ bias) past them, on poisoned outputs, against the reference op. The simulator covers
tiny shapes in tests/codegen/test_quant_linear.py.

Tolerances (as kernel_harness.TOLERANCE): the kernels round the dequantized weight as the
reference does and sum in float32 in another order: about two ulps of the output dtype, bf16
1.6e-2 and fp16 2e-3 relative, with as much absolute for results near 0 (they are ~N(0, 1)).
The reference's cuBLAS runs without reduced-precision reductions (float32 sums, as on a CPU).
"""

from __future__ import annotations

import pytest
import torch

from ir.ops import QuantLinear
from ir.quant import quantize
from ir.reference import DTYPE_NAMES, TORCH_DTYPES, RefContext, run_op
from ir.types import TensorType

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

TOLERANCE = {"bfloat16": (2e-2, 1.6e-2), "float16": (2e-3, 2e-3)}  # (atol, rtol)
ROWS = (1, 4, 8, 16, 64, 300)  # 8: the last the GEMV takes (BuildConstants.quant_gemv_rows)


@pytest.fixture
def float32_sums():
    """cuBLAS without reduced-precision reductions while the test runs."""
    matmul = torch.backends.cuda.matmul
    names = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")
    saved = [getattr(matmul, name) for name in names]
    for name in names:
        setattr(matmul, name, False)
    yield
    for name, value in zip(names, saved, strict=True):
        setattr(matmul, name, value)


@pytest.mark.parametrize("k,n,with_bias", [(4096, 6144, True), (14336, 4096, False)])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("fp8", 0)])
def test_quant_linear_matches_the_reference(float32_sums, k, n, with_bias, dtype, fmt, group):
    # imported here, not at collection: without a GPU, tests/codegen's harness picks numba's
    # simulator before numba is first imported
    from codegen.cuda.launch import launch
    from codegen.registry import BuildConstants, Gemm, build_kernels

    torch.manual_seed(0)
    torch_dtype, op = TORCH_DTYPES[dtype], QuantLinear(fmt, group)
    w = (torch.randn(n, k, device="cuda") * k**-0.5).to(torch_dtype)
    params = [
        *quantize(w, fmt, group),
        *([torch.randn(n, device="cuda").to(torch_dtype)] if with_bias else []),
    ]
    types = (
        TensorType((1, "T", k), dtype),
        *(TensorType(tuple(t.shape), DTYPE_NAMES[t.dtype]) for t in params),
    )
    kernels = build_kernels(op, types)
    atol, rtol = TOLERANCE[dtype]
    for rows in ROWS:
        x = torch.randn(1, rows, k, device="cuda").to(torch_dtype)
        out = torch.full((1, rows, n), float("nan"), dtype=torch_dtype, device="cuda")
        steps = kernels.steps({"T": rows})
        gemv = rows <= BuildConstants().quant_gemv_rows
        assert any(isinstance(s, Gemm) for s in steps) != gemv
        launch(
            kernels,
            {"T": rows},
            {"in0": x, **{f"in{i + 1}": t for i, t in enumerate(params)}, "out0": out},
        )
        (expected,) = run_op(op, RefContext({"T": rows}), x, *params)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"{rows} rows: unwritten or non-finite outputs"
        torch.testing.assert_close(
            out, expected, atol=atol, rtol=rtol, msg=lambda m, r=rows: f"{r} rows: {m}"
        )
