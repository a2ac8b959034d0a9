"""Fold params-only nodes into new pre-packed params (e.g. concatenated Q/K/V weights).

Unlike the Graph -> Graph passes this needs the weights: (graph, params) -> (graph, params),
still pure. Pre: verified graph, params for every param input. Post: no node has only param
inputs; unused params are gone.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from compiler.passes.dce import SIDE_EFFECTS, eliminate_dead_code
from ir.graph import Graph, Input
from ir.reference import RefContext, run_op


def fold_constants(
    graph: Graph, params: dict[str, torch.Tensor]
) -> tuple[Graph, dict[str, torch.Tensor]]:
    values = {i.value.name: params[i.value.name] for i in graph.params}
    new_inputs, nodes = list(graph.inputs), []
    ctx = RefContext(sizes={})
    for node in graph.nodes:
        const = node.inputs and all(n in values for n in node.inputs if n)
        if not const or isinstance(node.op, SIDE_EFFECTS):
            nodes.append(node)
            continue
        results = run_op(node.op, ctx, *(values[n] if n else None for n in node.inputs))
        for v, t in zip(node.outputs, results, strict=True):
            values[v.name] = t.contiguous()
            new_inputs.append(Input(v, "param"))
    folded = eliminate_dead_code(replace(graph, inputs=tuple(new_inputs), nodes=tuple(nodes)))
    return folded, {i.value.name: values[i.value.name] for i in folded.params}
