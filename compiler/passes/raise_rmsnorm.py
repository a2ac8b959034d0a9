"""Raise w * cast(x' * rsqrt(mean(x'^2, -1) + eps), x.dtype) with x' = x.float() into
RMSNorm(x, w), and w * (x' * rsqrt(mean(x'^2, -1) + eps)) (normalized and weighted in
float32, rounded after the weight if at all: Gemma's (1 + w) norms) into RMSNorm(x', w).

Pre: canonicalized (no identity casts). Post: each matched tree is one RMSNorm node; the
interior nodes are left for DCE.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def _up_from(rw: Rewriter, xp: str) -> str | None:
    """x when xp is x.float(): x itself in float32, or any x cast to float32; else None."""
    if rw.type_of(xp).dtype != "float32":
        return None  # a norm computed in a narrower dtype is not RMSNorm's
    cast = rw.producer(xp, ops.Cast)
    return cast.inputs[0] if cast else xp


def _normalized(rw: Rewriter, name: str) -> tuple[str, float] | None:
    """If `name` is (x' * rsqrt(mean(x'^2) + eps)).to(x.dtype) with x' = x.float(), return
    (x, eps); if it is x' * rsqrt(mean(x'^2) + eps) (never rounded), return (x', eps)."""
    back = rw.producer(name, ops.Cast)
    mul = rw.producer(back.inputs[0] if back else name, ops.Binary)
    if mul is None or mul.op.fn != "mul":
        return None
    for xp, r in (mul.inputs, reversed(mul.inputs)):
        rsqrt = rw.producer(r, ops.Unary)
        add = rsqrt and rsqrt.op.fn == "rsqrt" and rw.producer(rsqrt.inputs[0], ops.BinaryScalar)
        mean = add and add.op.fn == "add" and rw.producer(add.inputs[0], ops.Mean)
        if not mean or not mean.op.keepdim or len(mean.op.dims) != 1:
            continue
        pow_ = rw.producer(mean.inputs[0], ops.BinaryScalar)
        rank = rw.type_of(xp).rank
        if mean.op.dims[0] % rank != rank - 1 or not pow_ or pow_.op.scalar_first:
            continue
        if (pow_.op.fn, pow_.op.scalar) != ("pow", 2.0) or pow_.inputs[0] != xp:
            continue
        x = _up_from(rw, xp)
        if x is None:
            continue
        if back is None:  # weighted in float32 before any rounding (Gemma's): RMSNorm of x'
            return xp, add.op.scalar
        # the normalized value is rounded to x's dtype, as RMSNorm does, and only then
        if back.op.dtype == rw.type_of(x).dtype:
            return x, add.op.scalar
    return None


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    if not isinstance(node.op, ops.Binary) or node.op.fn != "mul":
        return None
    for w, y in (node.inputs, reversed(node.inputs)):
        found = _normalized(rw, y)
        if found is None or rw.type_of(w).shape != (rw.type_of(found[0]).shape[-1],):
            continue
        x, eps = found
        if ops.RMSNorm(eps).infer(rw.type_of(x), rw.type_of(w))[0] != node.outputs[0].type:
            continue
        return {node.outputs[0].name: rw.add(ops.RMSNorm(eps), x, w)[0]}
    return None


def raise_rmsnorm(graph: Graph) -> Graph:
    return rewrite(graph, _rule)
