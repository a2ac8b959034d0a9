"""Merge Linear nodes that share an input (Q/K/V, gate/up) into one wider Linear.

Pre: any verified graph. Post: for each input, its parameter Linears of equal weight dtype
and bias presence are one Linear over Concat(weights) (a params-only node that
fold_constants turns into a pre-packed weight), followed by one Slice per former output;
a last-dim Slice of such a Slice (a model's own split of a fused projection) becomes one
Slice of the merged Linear.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node
from ir.types import normalize_dim


def _operands(node: Node) -> tuple[str, str, str | None]:
    x, w, *bias = node.inputs
    return x, w, bias[0] if bias else None


def _key(node: Node, rw: Rewriter) -> tuple | None:
    if not isinstance(node.op, ops.Linear):
        return None
    x, w, bias = _operands(node)
    if w not in rw.params or (bias is not None and bias not in rw.params):
        return None
    return (x, rw.type_of(w).dtype, bias is None)


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
        x, _, has_bias = _operands(node)
        weight = rw.add(ops.Concat(0), *(_operands(n)[1] for n in group))[0]
        biases = [_operands(n)[2] for n in group]
        bias = rw.add(ops.Concat(0), *biases)[0] if has_bias else None
        y = rw.add(ops.Linear(), x, weight, *([bias] if bias else []))[0]
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
    if inner is None or rw.producer(inner.inputs[0], ops.Linear) is None:
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
