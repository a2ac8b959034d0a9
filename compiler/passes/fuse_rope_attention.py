"""Fuse rope (and the layout transposes) into PagedAttention's prologue.

Pre: Rope raised; attention in layout "bhtd" with q = Rope(Transpose(Xq, 1, 2), c, s),
k = Rope(Transpose(Xk, 1, 2), c, s), v = Transpose(Xv, 1, 2), c/s = Reshape([1, T, D] ->
[1, 1, T, D]), each Rope's output of its input's type (no promotion to the tables' dtype).
Post: PagedAttention(layout="bthd", rope=True)(Xq, Xk, Xv, cos, sin). When only the
transposes match, the op just switches to layout "bthd".
"""

from __future__ import annotations

from dataclasses import replace

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def _untransposed(rw: Rewriter, name: str) -> str | None:
    t = rw.producer(name, ops.Transpose)
    return t.inputs[0] if t and {t.op.dim0 % 4, t.op.dim1 % 4} == {1, 2} else None


def _table(rw: Rewriter, name: str) -> str | None:
    """[1, 1, T, D] view of a [1, T, D] cos/sin table -> the table."""
    r = rw.producer(name, ops.Reshape)
    if r is None:
        return None
    src = rw.type_of(r.inputs[0]).shape
    return r.inputs[0] if len(src) == 3 and rw.type_of(name).shape == (1, 1, *src[1:]) else None


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    op = node.op
    if not isinstance(op, ops.PagedAttention) or op.layout != "bhtd" or op.rope:
        return None
    q, k, v = node.inputs[:3]
    xv = _untransposed(rw, v)
    rq, rk = rw.producer(q, ops.Rope), rw.producer(k, ops.Rope)
    # the fused prologue rotates in q's and k's own dtype: no rope that promotes them
    same = (
        rq and rk and all(rw.type_of(r.inputs[0]) == rw.type_of(n) for r, n in ((rq, q), (rk, k)))
    )
    if same and rq.inputs[1:] == rk.inputs[1:] and xv:
        xq, xk = _untransposed(rw, rq.inputs[0]), _untransposed(rw, rk.inputs[0])
        cos, sin = _table(rw, rq.inputs[1]), _table(rw, rq.inputs[2])
        if xq and xk and cos and sin:
            fused = replace(op, layout="bthd", rope=True)
            return {node.outputs[0].name: rw.add(fused, xq, xk, xv, cos, sin)[0]}
    xq, xk = _untransposed(rw, q), _untransposed(rw, k)
    if xq and xk and xv:
        return {node.outputs[0].name: rw.add(replace(op, layout="bthd"), xq, xk, xv)[0]}
    return None


def fuse_rope_attention(graph: Graph) -> Graph:
    return rewrite(graph, _rule)
