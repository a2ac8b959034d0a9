"""Dead-code elimination: keep what the outputs need, plus side-effecting ops (KV writes).

Pre: any verified graph. Post: every node reaches an output or is PagedAttention; unused
params are dropped from the inputs (runtime inputs are kept: the calling convention).
"""

from __future__ import annotations

from dataclasses import replace

from ir import ops
from ir.graph import Graph

SIDE_EFFECTS = (ops.PagedAttention,)  # writes the KV cache even if its output were unused


def eliminate_dead_code(graph: Graph) -> Graph:
    live = set(graph.outputs)
    kept = []
    for node in reversed(graph.nodes):
        if isinstance(node.op, SIDE_EFFECTS) or any(v.name in live for v in node.outputs):
            kept.append(node)
            live.update(n for n in node.inputs if n)
    inputs = tuple(i for i in graph.inputs if i.kind == "input" or i.value.name in live)
    return replace(graph, inputs=inputs, nodes=tuple(reversed(kept)))
