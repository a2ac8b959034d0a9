"""Fuse an AddRMSNorm into the Linear its normed output feeds (and a merged gate/up
projection's SiluMul into it too): NormLinear, whose one-token kernel computes the norm in
each block of the GEMV instead of a kernel of its own (codegen/cuda/norm_linear.py).

Pre: AddRMSNorm fused, projections merged, params folded (a cuda target's graph, after
sharding). Post: AddRMSNorm -> Linear (no bias) with the normed value used by that Linear
alone is NormLinear; when the Linear's output is used only by its two halves' Slices and those
feed one SiluMul (gate, up), the SiluMul is part of it (act "silu_mul"). The sum output
replaces the AddRMSNorm's for every later use. Leaves the replaced nodes to DCE.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node
from ir.types import normalize_dim


def _norm_of(linear: Node, rw: Rewriter) -> Node | None:
    """The AddRMSNorm whose normed output is this bias-free Linear's input, used only here."""
    if not isinstance(linear.op, ops.Linear) or len(linear.inputs) != 2:
        return None
    norm = rw.producer(linear.inputs[0], ops.AddRMSNorm)
    if norm is None or norm.outputs[0].name != linear.inputs[0]:
        return None
    return norm if rw.single_use(linear.inputs[0]) else None


def _half(node: Node | None, type_of, which: int) -> str | None:
    """The sliced value when `node` is the first (which=0) or second half of its last dim."""
    if node is None or not isinstance(node.op, ops.Slice) or node.op.step != 1:
        return None
    t = type_of(node.inputs[0])
    width = t.shape[-1]
    if normalize_dim(node.op.dim, t.rank) != t.rank - 1 or not isinstance(width, int):
        return None
    if width % 2:  # halves of unequal widths: not a gate/up pair
        return None
    if (node.op.start, min(node.op.end, width)) != (which * width // 2, (which + 1) * width // 2):
        return None
    return node.inputs[0]


def _fused(norm: Node, linear: Node, act: str | None, rw: Rewriter) -> tuple[str, str]:
    x, residual, norm_weight = norm.inputs
    return rw.add(ops.NormLinear(norm.op.eps, act), x, residual, norm_weight, linear.inputs[1])


def fuse_norm_linear(graph: Graph) -> Graph:
    users, producers = graph.users(), graph.producers()
    gated: set[str] = set()  # Linear outputs whose halves feed one SiluMul alone
    for node in graph.nodes:
        if isinstance(node.op, ops.SiluMul):
            gate, up = (producers.get(v) for v in node.inputs)
            h = _half(gate, graph.type_of, 0)
            alone = all(len(users[v]) == 1 for v in node.inputs)
            if h is not None and h == _half(up, graph.type_of, 1) and alone and len(users[h]) == 2:
                gated.add(h)

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        if isinstance(node.op, ops.Linear) and node.outputs[0].name in gated:
            return None  # fused at its SiluMul
        if isinstance(node.op, ops.SiluMul):
            h = _half(rw.producer(node.inputs[0], ops.Slice), rw.type_of, 0)
            linear = rw.producer(h, ops.Linear) if h in gated else None
            norm = _norm_of(linear, rw) if linear else None
            if norm is None:
                return None
            out, total = _fused(norm, linear, "silu_mul", rw)
            return {node.outputs[0].name: out, norm.outputs[1].name: total}
        norm = _norm_of(node, rw)
        if norm is None:
            return None
        out, total = _fused(norm, node, None, rw)
        return {node.outputs[0].name: out, norm.outputs[1].name: total}

    return rewrite(graph, rule)
