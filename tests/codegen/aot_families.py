"""Compile one kernel of every family for sm_90 and print their metadata as JSON.

Run as a script, in a process without NUMBA_ENABLE_CUDASIM: the simulator has no compiler.
"""

import json
import re
import sys

import codegen.cuda  # noqa: F401 (registers the builders)
from codegen.aot import compile_kernel
from codegen.registry import BuildConstants, build_kernels
from ir.ops import (
    AddRMSNorm,
    Embedding,
    FusedElementwise,
    GatherLastTokens,
    LayerNorm,
    NormLinear,
    PagedAttention,
    QuantLinear,
    RMSNorm,
    SiluMul,
)
from ir.types import TensorType


def cases():
    bf = "bfloat16"
    x = TensorType((1, "T", 40), bf)
    heads = (TensorType((1, "T", 4, 16), bf), *[TensorType((1, "T", 2, 16), bf)] * 2)
    cos_sin = [TensorType((1, "T", 16), "float32")] * 2
    expr = ("mul", ("gelu_tanh", ("arg", 0)), ("cast", "float16", ("arg", 1)))
    x4k, groups = TensorType((1, "T", 4096), bf), TensorType((24, 32), bf)
    bias, fp8_scales = TensorType((24,), bf), TensorType((24,), "float32")
    return [
        (Embedding(), (TensorType((100, 40), bf), TensorType((1, "T"), "int64"))),
        (RMSNorm(1e-6), (x, TensorType((40,), bf))),
        (AddRMSNorm(1e-6), (x, x, TensorType((40,), "float32"))),
        (LayerNorm(1e-5), (x, TensorType((40,), bf), TensorType((40,), bf))),
        (LayerNorm(1e-5), (x, TensorType((40,), "float32"))),  # no bias
        (SiluMul(), (x, x)),
        (FusedElementwise(expr, "float16"), (x, TensorType((40,), "float32"))),
        (GatherLastTokens(), (x, TensorType(("B",), "int64"))),
        (NormLinear(1e-6), (x, x, TensorType((40,), bf), TensorType((24, 40), bf))),
        (NormLinear(1e-6, "silu_mul"), (x, x, TensorType((40,), bf), TensorType((24, 40), bf))),
        (PagedAttention(0, 4, 2, 16, 0.25, 8, 30.0, "bthd", True), (*heads, *cos_sin)),
        (PagedAttention(0, 4, 2, 16, 0.25, layout="bthd"), heads),
        # a real width (chunks of words in a loop): the GEMV, dequant and bias-add kernels
        (QuantLinear("int4", 128), (x4k, TensorType((24, 512), "int32"), *[groups] * 2, bias)),
        (QuantLinear("fp8"), (x4k, TensorType((24, 4096), "float8_e4m3fn"), fp8_scales)),
    ]


def main(arch: str) -> None:
    records = []
    for op, inputs in cases():
        for kernel in build_kernels(op, inputs, BuildConstants(block_size=16)).generated:
            compiled = compile_kernel(kernel, arch)
            declared = rf"\.param\s+\.\w+\s+{re.escape(compiled.symbol)}_param_\d+"
            ptx_params = len(re.findall(declared, compiled.ptx))
            records.append(
                {
                    **compiled.metadata(),
                    "op": type(op).__name__,
                    "cubin_magic": compiled.cubin[:4].hex(),
                    "cubin_bytes": len(compiled.cubin),
                    "ptx_target": compiled.ptx.split(".target", 1)[1].split()[0],
                    "ptx_params": ptx_params,
                    "local_depot": "__local_depot" in compiled.ptx,
                }
            )
    json.dump(records, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
