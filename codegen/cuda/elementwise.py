"""FusedElementwise: a kernel generated from the op's expression tree.

The tree becomes straight-line Python source (one SSA temporary per distinct subtree, so
shared subtrees are computed once), with broadcasting resolved at build time into the index
of each input, and numba compiles that source. Everything is evaluated in float32, as the
reference does; ("cast", dtype, e) rounds through `dtype`.
"""

from __future__ import annotations

import linecache
import logging
import math

import numpy as np

from codegen.cuda.dtypes import LOAD, STORE
from codegen.numba_shim import cuda
from codegen.registry import (
    BuildConstants,
    Kernel,
    OpKernels,
    Param,
    cdiv,
    concrete,
    kernel_for,
    kernel_name,
)
from ir.ops import FusedElementwise
from ir.types import TensorType

log = logging.getLogger(__name__)

THREADS = 256
UNARY_SRC = {
    "neg": "-{0}",
    "rsqrt": "ONE / math.sqrt({0})",
    "sqrt": "math.sqrt({0})",
    "silu": "{0} / (ONE + math.exp(-{0}))",
    "gelu": "HALF * {0} * (ONE + math.erf({0} * INV_SQRT2))",
    "gelu_tanh": (
        "HALF * {0} * (ONE + math.tanh(SQRT_2_OVER_PI * ({0} + GELU_C * {0} * {0} * {0})))"
    ),
    "cos": "math.cos({0})",
    "sin": "math.sin({0})",
    "exp": "math.exp({0})",
    "tanh": "math.tanh({0})",
}
BINARY_SRC = {
    "add": "{0} + {1}",
    "sub": "{0} - {1}",
    "mul": "{0} * {1}",
    "div": "{0} / {1}",
    "pow": "{0} ** {1}",
}
# float32 constants keep numba's arithmetic in float32 (a Python float would widen it).
BASE_NAMESPACE = {
    "ONE": np.float32(1.0),
    "HALF": np.float32(0.5),
    "INV_SQRT2": np.float32(1.0 / math.sqrt(2.0)),
    "SQRT_2_OVER_PI": np.float32(math.sqrt(2.0 / math.pi)),
    "GELU_C": np.float32(0.044715),
}


class _Emitter:
    """Turns an expression tree into SSA lines; identical subtrees share one temporary."""

    def __init__(self, arg_exprs: list[str]) -> None:
        self.arg_exprs = arg_exprs
        self.lines: list[str] = []
        self.names: dict[tuple, str] = {}
        self.namespace: dict[str, object] = {}

    def emit(self, expr: tuple) -> str:
        if expr[0] == "const":  # a float32 name in the namespace, no line of its own
            name = f"c{len(self.namespace)}"
            self.namespace[name] = np.float32(expr[1])
            return name
        if expr not in self.names:
            self.names[expr] = self._define(expr)
        return self.names[expr]

    def _define(self, expr: tuple) -> str:
        head = expr[0]
        if head == "arg":
            value = self.arg_exprs[expr[1]]
        elif head == "cast":  # round through the dtype: store to it, load back
            dtype = expr[1]
            self.namespace[f"load_{dtype}"] = LOAD[dtype]
            self.namespace[f"store_{dtype}"] = STORE[dtype]
            value = f"load_{dtype}(store_{dtype}({self.emit(expr[2])}))"
        elif head in UNARY_SRC:
            value = UNARY_SRC[head].format(self.emit(expr[1]))
        elif head in BINARY_SRC:
            value = BINARY_SRC[head].format(self.emit(expr[1]), self.emit(expr[2]))
        else:
            raise ValueError(f"FusedElementwise: unknown expression node {head!r}")
        name = f"t{len(self.lines)}"  # after the operands, which define their own
        self.lines.append(f"{name} = {value}")
        return name


def _index(in_shape: tuple, out_shape: tuple) -> str:
    """Index of input element for output index (i0, i1, ...): broadcast dims read index 0."""
    lead = len(out_shape) - len(in_shape)
    dims = [
        "0" if d == 1 and out_shape[lead + k] != 1 else f"i{lead + k}"
        for k, d in enumerate(in_shape)
    ]
    return ", ".join(dims) if dims else "()"


def _unflatten(out_shape: tuple) -> list[str]:
    """Lines splitting the flat index n into i0..iR-1; static sizes become literals."""
    lines, rank = ["r = n"], len(out_shape)
    for k in range(rank - 1, 0, -1):
        size = out_shape[k] if isinstance(out_shape[k], int) else f"out.shape[{k}]"
        lines += [f"i{k} = r % {size}", f"r //= {size}"]
    return [*lines, "i0 = r"]


def generate_source(op: FusedElementwise, inputs: tuple[TensorType, ...]) -> tuple[str, dict]:
    """Python source of the kernel and the names it needs, for these input types."""
    out_shape = op.infer(*inputs)[0].shape
    namespace = {f"load{i}": LOAD[t.dtype] for i, t in enumerate(inputs)}
    namespace["store_out"] = STORE[op.dtype]
    em = _Emitter([f"load{i}(a{i}[{_index(t.shape, out_shape)}])" for i, t in enumerate(inputs)])
    result = em.emit(op.expr)
    body = [
        *_unflatten(out_shape),
        *em.lines,
        f"out[{_index(out_shape, out_shape)}] = store_out({result})",
    ]
    args = ", ".join(["out", *(f"a{i}" for i in range(len(inputs)))])
    src = "\n".join(
        [
            f"def fused_elementwise({args}):",
            "    n = cuda.grid(1)",
            "    if n < out.size:",
            *(f"        {line}" for line in body),
        ]
    )
    return src + "\n", {**namespace, **em.namespace}


def _compile(src: str, namespace: dict, name: str):
    filename = f"<{name}>"
    linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)  # tracebacks
    scope = {"cuda": cuda, "math": math, "__name__": __name__, **BASE_NAMESPACE, **namespace}
    exec(compile(src, filename, "exec"), scope)
    return cuda.jit(scope["fused_elementwise"])


@kernel_for(FusedElementwise)
def build_fused_elementwise(
    op: FusedElementwise, inputs: tuple[TensorType, ...], consts: BuildConstants
):
    if not inputs or any(t.rank == 0 for t in inputs):
        raise ValueError("FusedElementwise kernel needs inputs of rank >= 1")
    out = op.infer(*inputs)[0]
    name = kernel_name("fused_elementwise", op.expr, op.dtype, inputs)
    src, namespace = generate_source(op, inputs)
    log.debug("generated %s:\n%s", name, src)
    params = (
        Param("out0", op.dtype, out.rank),
        *(Param(f"in{i}", t.dtype, t.rank, layout="A") for i, t in enumerate(inputs)),
    )
    grid = lambda s: (cdiv(math.prod(concrete(out.shape, s)), THREADS),)  # noqa: E731
    kernel = Kernel(name, _compile(src, namespace, name), params, (THREADS,), grid)
    return OpKernels((kernel,))
