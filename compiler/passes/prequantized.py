"""Put a pre-quantized checkpoint's packed weights (frontend/quantized.py) in the traced graph:
Linear(x, w[, bias]) -> QuantLinear("int4", group)(x, qweight, scales, zeros[, bias]), the
group size read off the shapes (inputs / scales' columns).

Like fold_constants it adds params: (graph, params, packed) -> (graph, params), pure. Pre:
the traced graph, `packed` keyed by the names of float weights it holds (placeholders whose
values are never read). Post: every packed weight's Linear is a QuantLinear over the new
params `<prefix>.qweight/.scales/.zeros`; no placeholder weight is left in the graph or the
params (a packed weight that no Linear uses is an error). Runs before merge_projections,
which merges QuantLinears as it merges Linears.
"""

from __future__ import annotations

import torch

from compiler.passes.dce import eliminate_dead_code
from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node
from ir.reference import DTYPE_NAMES
from ir.types import TensorType

PARTS = ("qweight", "scales", "zeros")


def use_packed(
    graph: Graph,
    params: dict[str, torch.Tensor],
    packed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[Graph, dict[str, torch.Tensor]]:
    new: dict[str, torch.Tensor] = {}

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        w = node.inputs[1] if isinstance(node.op, ops.Linear) else None
        if w not in packed:
            return None
        x, _, *bias = node.inputs
        names = [f"{w.removesuffix('.weight')}.{part}" for part in PARTS]
        for name, t in zip(names, packed[w], strict=True):
            if name not in new:  # a weight two Linears share: its params once
                rw.builder.input(name, TensorType(tuple(t.shape), DTYPE_NAMES[t.dtype]), "param")
                new[name] = t
        qweight, scales, _ = packed[w]
        group = qweight.shape[1] * 8 // scales.shape[1]
        y = rw.add(ops.QuantLinear("int4", group), x, *names, *(b for b in bias if b))[0]
        return {node.outputs[0].name: y}

    graph = eliminate_dead_code(rewrite(graph, rule))
    left = set(packed) & {i.value.name for i in graph.params}
    unused = {w for w in packed if f"{w.removesuffix('.weight')}.qweight" not in new}
    if left or unused:
        raise ValueError(
            f"packed weights not (only) used by Linears: {sorted(left | unused)[:5]} (a "
            "quantized projection kiln's graph does not have as one Linear)"
        )
    kept = {i.value.name for i in graph.params}
    return graph, {k: v for k, v in {**params, **new}.items() if k in kept}
