"""Fuse a residual add feeding an RMSNorm into AddRMSNorm (one pass over the hidden state).

Pre: RMSNorm raised. Post: RMSNorm(a + b) is AddRMSNorm(a, b) whose second output replaces
every later use of the sum.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def _rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
    if not isinstance(node.op, ops.RMSNorm):
        return None
    s, w = node.inputs
    add = rw.producer(s, ops.Binary)
    if not add or add.op.fn != "add" or rw.type_of(add.inputs[0]) != rw.type_of(add.inputs[1]):
        return None
    normed, total = rw.add(ops.AddRMSNorm(node.op.eps), *add.inputs, w)
    return {node.outputs[0].name: normed, s: total}


def fuse_add_rmsnorm(graph: Graph) -> Graph:
    return rewrite(graph, _rule)
