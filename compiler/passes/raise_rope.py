"""Raise x * cos + cat(-x[..., h:], x[..., :h]) * sin into Rope(x, cos, sin).

Pre: canonicalized. Post: each rotate-half rotary embedding is one Rope node.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def _mul_operands(rw: Rewriter, name: str) -> tuple[str, str] | None:
    mul = rw.producer(name, ops.Binary)
    return tuple(mul.inputs) if mul and mul.op.fn == "mul" else None


def _rotated_source(rw: Rewriter, name: str) -> str | None:
    """If `name` is cat(-x[..., h:], x[..., :h], dim=-1), return x."""
    cat = rw.producer(name, ops.Concat)
    if cat is None or len(cat.inputs) != 2:
        return None
    rank = rw.type_of(name).rank
    neg = rw.producer(cat.inputs[0], ops.Unary)
    hi = neg and neg.op.fn == "neg" and rw.producer(neg.inputs[0], ops.Slice)
    lo = rw.producer(cat.inputs[1], ops.Slice)
    if not hi or not lo or cat.op.dim % rank != rank - 1 or hi.inputs[0] != lo.inputs[0]:
        return None
    size = rw.type_of(hi.inputs[0]).shape[-1]
    half = size // 2
    ok = (
        hi.op.dim % rank == lo.op.dim % rank == rank - 1
        and (hi.op.start, hi.op.end, lo.op.start, lo.op.end) == (half, size, 0, half)
        and hi.op.step == lo.op.step == 1
    )
    return hi.inputs[0] if ok else None


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    if not isinstance(node.op, ops.Binary) or node.op.fn != "add":
        return None
    for a, b in (node.inputs, reversed(node.inputs)):
        direct, rotated = _mul_operands(rw, a), _mul_operands(rw, b)
        if not direct or not rotated:
            continue
        for x, cos in (direct, reversed(direct)):
            for r, sin in (rotated, reversed(rotated)):
                if _rotated_source(rw, r) == x:
                    rope = ops.Rope()
                    if (
                        rope.infer(*(rw.type_of(n) for n in (x, cos, sin)))[0]
                        == node.outputs[0].type
                    ):
                        return {node.outputs[0].name: rw.add(rope, x, cos, sin)[0]}
    return None


def raise_rope(graph: Graph) -> Graph:
    return rewrite(graph, _rule)
