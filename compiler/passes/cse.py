"""Common-subexpression elimination: one node per (op, inputs) for pure ops.

Pre: any verified graph. Post: no two pure nodes with equal op and inputs.
"""

from __future__ import annotations

import math
from dataclasses import fields

from compiler.passes.dce import SIDE_EFFECTS
from compiler.passes.rewrite import Rewriter, rewrite
from ir.graph import Graph, Node


def _scalar_kinds(op) -> tuple:
    """What == ignores in an op's scalars: int or float, and the sign of a zero (-0.0 == 0.0,
    but 1 / (x * -0.0) is not 1 / (x * 0.0))."""
    values = (getattr(op, f.name) for f in fields(op))
    return tuple((type(v), math.copysign(1.0, v)) for v in values if isinstance(v, int | float))


def cse(graph: Graph) -> Graph:
    seen: dict[tuple, tuple[str, ...]] = {}

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        if isinstance(node.op, SIDE_EFFECTS):
            return None
        key = (node.op, _scalar_kinds(node.op), node.inputs)
        names = tuple(v.name for v in node.outputs)
        if key not in seen:
            seen[key] = names
            return None
        return dict(zip(names, seen[key], strict=True))

    return rewrite(graph, rule)
