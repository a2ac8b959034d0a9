"""Merge projections that share an input (Q/K/V, gate/up) into one wider projection.

Pre: any verified graph. Post: for each input, its Linears over params of equal weight dtype
and bias presence are one Linear over Concat(weights) (a params-only node that
fold_constants turns into a pre-packed weight), followed by one Slice per former output;
QuantLinears of one format and group size (pre-quantized checkpoints) likewise, their
qweights, scales, zeros and biases each concatenated along the output rows. A last-dim
Slice of such a Slice (a model's own split of a fused projection) becomes one Slice of the
merged projection.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node
from ir.types import normalize_dim

PROJECTIONS = (ops.Linear, ops.QuantLinear)  # every operand after x has a row per output


def _key(node: Node, rw: Rewriter) -> tuple | None:
    if not isinstance(node.op, PROJECTIONS):
        return None
    weights = [n for n in node.inputs[1:] if n]
    if not all(w in rw.params for w in weights):
        return None
    return (node.inputs[0], node.op, tuple(rw.type_of(w).dtype for w in weights))


def merge_projections(graph: Graph) -> Graph:
    probe = Rewriter(graph)
    groups: dict[tuple, list[Node]] = {}
    for node in graph.nodes:
        if (key := _key(node, probe)) is not None:
            groups.setdefault(key, []).append(node)
    merged = {id(g[0]): g for g in groups.values() if len(g) > 1}
    absorbed = {id(n) for g in merged.values() for n in g[1:]}

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        if id(node) in absorbed:
            return {}  # its output was renamed when the group's first node was merged
        group = merged.get(id(node))
        if group is None:
            return None
        operands = zip(*([w for w in n.inputs[1:] if w] for n in group), strict=True)
        weights = [rw.add(ops.Concat(0), *parts)[0] for parts in operands]
        y = rw.add(node.op, node.inputs[0], *weights)[0]
        start, renames = 0, {}
        for n in group:
            width = rw.type_of(n.inputs[1]).shape[0]
            renames[n.outputs[0].name] = rw.add(ops.Slice(-1, start, start + width), y)[0]
            start += width
        return renames

    # absorbed nodes come after their group's first node, so their renames already exist
    return rewrite(rewrite(graph, rule), _join_slices)


def _join_slices(node: Node, rw: Rewriter) -> dict[str, str] | None:
    """A slice of a merged projection's slice (q/k/v the model split itself off one Linear):
    one slice of the projection, which the shard pass can segment."""
    op = node.op
    inner = rw.producer(node.inputs[0], ops.Slice) if isinstance(op, ops.Slice) else None
    if inner is None or rw.producer(inner.inputs[0], PROJECTIONS) is None:
        return None
    rank = node.outputs[0].type.rank
    if {normalize_dim(op.dim, rank), normalize_dim(inner.op.dim, rank)} != {rank - 1}:
        return None
    if op.step != 1 or inner.op.step != 1:
        return None
    base, _, _ = slice(inner.op.start, inner.op.end).indices(rw.type_of(inner.inputs[0]).shape[-1])
    start, end, _ = slice(op.start, op.end).indices(rw.type_of(node.inputs[0]).shape[-1])
    joined = ops.Slice(-1, base + start, base + end)
    return {node.outputs[0].name: rw.add(joined, inner.inputs[0])[0]}
