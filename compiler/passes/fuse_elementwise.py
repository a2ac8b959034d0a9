"""Fuse trees of elementwise ops into FusedElementwise nodes holding an expression tree.

Pre: any verified graph. Post: every fusible elementwise node (floats only, scalars exact in
their operand's dtype or multiplying it) whose value feeds exactly one other fusible node is
folded into that node's tree; trees of two or more ops become one FusedElementwise.
Intermediate results narrower than float32 keep an explicit cast, so the fused tree rounds
exactly where the unfused ops did.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node
from ir.reference import TORCH_DTYPES
from ir.types import TensorType

ELEMENTWISE = (ops.Unary, ops.Binary, ops.BinaryScalar, ops.Cast)
FLOATS = ("float32", "bfloat16", "float16")


def _exact(scalar: float, dtype: str) -> bool:
    return torch.tensor(scalar, dtype=torch.float64).to(TORCH_DTYPES[dtype]).item() == scalar


def _fusible(node: Node, type_of: Callable[[str], TensorType]) -> bool:
    """An elementwise node over floats (the tree computes in float32: integer arithmetic past
    2**24 would round; a cast of integers to float32 reads them as the tree does) whose
    scalar, if any, is exact in its operand's dtype or multiplies it: torch rounds a scalar
    to a bf16 or fp16 operand's dtype for some ops on the CPU and not on a GPU (add, sub,
    pow, scalar first), divides by one as a multiplication by its reciprocal on a GPU only,
    and multiplies by it in float32 on both, as the tree does (GELU-tanh's 0.044715)."""
    op = node.op
    if not isinstance(op, ELEMENTWISE) or node.outputs[0].type.dtype not in FLOATS:
        return False
    if isinstance(op, ops.Cast) and op.dtype == "float32":
        return True
    dtypes = [type_of(x).dtype for x in node.inputs]
    if any(d not in FLOATS for d in dtypes):
        return False
    if not isinstance(op, ops.BinaryScalar) or (op.fn == "mul" and not op.scalar_first):
        return True
    if op.fn == "pow" and dtypes[0] != "float32" and op.scalar != 2.0:  # CPU: x**3 = (x*x)*x
        return False  # rounded after each product in bf16, in float32 on a GPU
    return _exact(op.scalar, dtypes[0])


def _absorbable(graph: Graph) -> set[str]:
    """Values made by a fusible node and used once, by a fusible node."""
    users = graph.users()
    outputs = set(graph.outputs)
    return {
        v.name
        for n in graph.nodes
        if _fusible(n, graph.type_of)
        for v in n.outputs
        if v.name not in outputs
        and len(users.get(v.name, [])) == 1
        and _fusible(users[v.name][0], graph.type_of)
    }


def _expr(node: Node, rw: Rewriter, absorbed: set[str], args: list[str]) -> tuple[tuple, int]:
    """Expression of `node` over leaf args (appended to `args`), and its op count."""
    count, subs = 1, []
    for name in node.inputs:
        producer = rw.producer(name) if name in absorbed else None
        if producer is None:
            if name not in args:
                args.append(name)
            subs.append(("arg", args.index(name)))
            continue
        sub, n = _expr(producer, rw, absorbed, args)
        dtype = producer.outputs[0].type.dtype
        subs.append(sub if dtype == "float32" else ("cast", dtype, sub))
        count += n
    op = node.op
    if isinstance(op, ops.Cast):
        return ("cast", op.dtype, subs[0]), count
    if isinstance(op, ops.Unary):
        return (op.fn, subs[0]), count
    if isinstance(op, ops.Binary):
        return (op.fn, subs[0], subs[1]), count
    const = ("const", op.scalar)
    return ((op.fn, const, subs[0]) if op.scalar_first else (op.fn, subs[0], const)), count


def fuse_elementwise(graph: Graph) -> Graph:
    absorbed = _absorbable(graph)

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        out = node.outputs[0]
        if not _fusible(node, rw.type_of) or out.name in absorbed:
            return None
        args: list[str] = []
        expr, count = _expr(node, rw, absorbed, args)
        fused = ops.FusedElementwise(expr, out.type.dtype)
        if count < 2 or fused.infer(*(rw.type_of(a) for a in args))[0] != out.type:
            return None
        return {out.name: rw.add(fused, *args)[0]}

    return rewrite(graph, rule)
