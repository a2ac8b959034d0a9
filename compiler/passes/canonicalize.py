"""Canonicalize: drop no-op casts/reshapes/slices/transposes and identity arithmetic.

Pre: any verified graph. Post: no Cast to the same dtype, no Reshape to the same shape, no
Reshape of a Reshape, no Transpose undoing a Transpose, no x*1, x/1, x+0, x-0, no full Slice.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node

IDENTITY_SCALARS = {("mul", 1.0), ("div", 1.0), ("add", 0.0), ("sub", 0.0)}


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    op, out = node.op, node.outputs[0]
    x = node.inputs[0] if node.inputs else None
    if isinstance(op, ops.Cast | ops.Reshape) and x and rw.type_of(x) == out.type:
        return {out.name: x}
    if (
        isinstance(op, ops.BinaryScalar)
        and not op.scalar_first
        and ((op.fn, op.scalar) in IDENTITY_SCALARS)
    ):
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
