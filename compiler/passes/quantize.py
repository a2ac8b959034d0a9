"""Quantize the weights of the graph's projections: Linear(x, w) -> QuantLinear(x,
*QuantizeWeight(w)), a params-only QuantizeWeight that fold_constants turns into the packed
weights (so the pass itself stays a pure Graph -> Graph function).

Pre: verified graph, after sharding (each rank's weights are quantized on their own). Post:
every Linear over a parameter weight is a QuantLinear, except the one that makes the logits
(kept in the model's dtype, as vLLM keeps lm_head) and those the format cannot take (an input
width the int4 group size does not divide), which stay Linears.
"""

from __future__ import annotations

from collections.abc import Callable

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node


def lm_head(graph: Graph) -> Node | None:
    """The Linear that makes the logits, found back from the output through views and casts."""
    producers, name = graph.producers(), graph.outputs[0]
    while (node := producers.get(name)) is not None and not isinstance(node.op, ops.Linear):
        name = node.inputs[0]
    return node


def quantize_linears(fmt: str, group_size: int) -> Callable[[Graph], Graph]:
    def quantize(graph: Graph) -> Graph:
        head = lm_head(graph)
        logits = head.outputs[0].name if head else None

        def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
            if not isinstance(node.op, ops.Linear) or node.outputs[0].name == logits:
                return None
            x, w, *bias = (n for n in node.inputs if n)
            if w not in rw.params or not quantizable(fmt, group_size, rw.type_of(w)):
                return None
            packed = rw.add(ops.QuantizeWeight(fmt, group_size), w)
            y = rw.add(ops.QuantLinear(fmt, group_size), x, *packed, *bias)[0]
            return {node.outputs[0].name: y}

        return rewrite(graph, rule)

    quantize.__name__ = f"quantize_{fmt}"
    return quantize


def quantizable(fmt: str, group_size: int, w) -> bool:
    try:
        ops.check_quant(fmt, group_size, w)
    except ValueError:
        return False
    return True
