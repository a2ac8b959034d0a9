"""Canonicalize: drop no-op casts/reshapes/slices/transposes and identity arithmetic.

Pre: any verified graph. Post: no Cast to the same dtype, no Reshape to the same shape, no
Reshape of a Reshape, no Transpose undoing a Transpose, no x*1, x/1, x+(-0.0), x-0.0, no full
Slice.
"""

from __future__ import annotations

import math

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def _identity(op: ops.BinaryScalar) -> bool:
    """x * 1, x / 1, x + (-0.0), x - (+0.0): x itself, -0.0 included (x + 0.0 makes -0.0 +0.0)."""
    s = op.scalar
    if op.scalar_first or op.fn not in ("mul", "div", "add", "sub"):
        return False
    if op.fn in ("mul", "div"):
        return s == 1
    negative = math.copysign(1.0, s) < 0
    return s == 0 and (isinstance(s, int) or negative == (op.fn == "add"))


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    op, out = node.op, node.outputs[0]
    x = node.inputs[0] if node.inputs else None
    if isinstance(op, ops.Cast | ops.Reshape) and x and rw.type_of(x) == out.type:
        return {out.name: x}
    if isinstance(op, ops.BinaryScalar) and _identity(op):
        return {out.name: x}
    if isinstance(op, ops.Slice) and rw.type_of(x) == out.type and op.step == 1:
        return {out.name: x}
    if isinstance(op, ops.Reshape) and (inner := rw.producer(x, ops.Reshape)):
        return {out.name: rw.add(op, inner.inputs[0])[0]}
    if isinstance(op, ops.Transpose) and (inner := rw.producer(x, ops.Transpose)):
        rank = out.type.rank
        if {op.dim0 % rank, op.dim1 % rank} == {inner.op.dim0 % rank, inner.op.dim1 % rank}:
            return {out.name: inner.inputs[0]}
    return None


def canonicalize(graph: Graph) -> Graph:
    return rewrite(graph, _rule)
