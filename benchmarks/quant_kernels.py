"""BENCH.md K2: quantized projections (int4 per group of 128, fp8 per row) against bf16
cuBLAS, on Llama-3.1-8B's MLP shapes (4096 -> 14336 and 14336 -> 4096) at 1, 4, 16 and 64
rows. Bandwidth counts the bytes a variant must move at least: its weights (packed, with
scales and zeros), the input and the output."""

from __future__ import annotations

import torch

from benchmarks.kernel_timing import DEFAULTS, bw_row, gpu_time, numba_op
from ir import ops
from ir.quant import quantize
from ir.reference import DTYPE_NAMES, REFERENCE, RefContext
from ir.types import TensorType

SHAPES = ((4096, 14336), (14336, 4096))  # (in, out)
ROWS = (1, 4, 16, 64)
FORMATS = (("int4", 128), ("fp8", 0))
QUANT_REF, CTX = REFERENCE[ops.QuantLinear], RefContext({})  # dequantize, then cuBLAS


def k2(shapes=SHAPES, rows=ROWS, consts=DEFAULTS) -> list[dict]:
    out = []
    for k, n in shapes:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        packed = {fmt: (fmt, g, quantize(w, fmt, g)) for fmt, g in FORMATS}
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            act = x.nbytes + y.nbytes
            name = f"K2 {k}x{n} rows {m}"
            cublas = gpu_time(lambda x=x, y=y, w=w: torch.mm(x, w.t(), out=y))
            timed = [("bf16 cuBLAS", cublas, w.nbytes + act)]
            for fmt, g, tensors in packed.values():
                moved = sum(t.nbytes for t in tensors) + act
                op = ops.QuantLinear(fmt, g)
                types = (TensorType((m, k), "bfloat16"), *(_type(t) for t in tensors))
                bound = {f"in{i}": t for i, t in enumerate((x, *tensors))} | {"out0": y}
                kernel = gpu_time(numba_op(op, types, bound, {"T": m}, consts))
                torch_ref = gpu_time(lambda op=op, t=tensors, x=x: QUANT_REF(op, CTX, x, *t))
                timed += [(f"numba {fmt}", kernel, moved), (f"torch {fmt}", torch_ref, moved)]
            for variant, timing, moved in timed:
                row = bw_row(name, variant, timing, moved)
                out.append(row | {"vs_cublas": f"{cublas.median / timing.median:.2f}x"})
    return out


def _type(t: torch.Tensor) -> TensorType:
    return TensorType(tuple(t.shape), DTYPE_NAMES[t.dtype])
