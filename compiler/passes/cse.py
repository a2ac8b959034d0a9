"""Common-subexpression elimination: one node per (op, inputs) for pure ops.

Pre: any verified graph. Post: no two pure nodes with equal op and inputs.
"""

from __future__ import annotations

from compiler.passes.dce import SIDE_EFFECTS
from compiler.passes.rewrite import Rewriter, rewrite
from ir.graph import Graph, Node


def cse(graph: Graph) -> Graph:
    seen: dict[tuple, tuple[str, ...]] = {}

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        if isinstance(node.op, SIDE_EFFECTS):
            return None
        key = (node.op, node.inputs)
        names = tuple(v.name for v in node.outputs)
        if key not in seen:
            seen[key] = names
            return None
        return dict(zip(names, seen[key], strict=True))

    return rewrite(graph, rule)
