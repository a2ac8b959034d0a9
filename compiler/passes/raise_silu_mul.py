"""Raise silu(a) * b into SiluMul(a, b).

Pre: any verified graph. Post: gated-SiLU activations are SiluMul nodes.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    if not isinstance(node.op, ops.Binary) or node.op.fn != "mul":
        return None
    for a, b in (node.inputs, reversed(node.inputs)):
        silu = rw.producer(a, ops.Unary)
        if silu and silu.op.fn == "silu" and rw.type_of(silu.inputs[0]) == rw.type_of(b):
            return {node.outputs[0].name: rw.add(ops.SiluMul(), silu.inputs[0], b)[0]}
    return None


def raise_silu_mul(graph: Graph) -> Graph:
    return rewrite(graph, _rule)
