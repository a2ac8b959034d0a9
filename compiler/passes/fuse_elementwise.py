"""Fuse trees of elementwise ops into FusedElementwise nodes holding an expression tree.

Pre: any verified graph. Post: every elementwise node whose value feeds exactly one other
elementwise node is folded into that node's tree; trees of two or more ops become one
FusedElementwise. Intermediate results narrower than float32 keep an explicit cast, so the
fused tree rounds exactly where the unfused ops did.
"""

from __future__ import annotations

from compiler.passes.rewrite import Rewriter, rewrite
from ir import ops
from ir.graph import Graph, Node

ELEMENTWISE = (ops.Unary, ops.Binary, ops.BinaryScalar, ops.Cast)


def _absorbable(graph: Graph) -> set[str]:
    """Values made by an elementwise node and used once, by an elementwise node."""
    users = graph.users()
    outputs = set(graph.outputs)
    return {
        v.name
        for n in graph.nodes
        if isinstance(n.op, ELEMENTWISE)
        for v in n.outputs
        if v.name not in outputs
        and len(users.get(v.name, [])) == 1
        and isinstance(users[v.name][0].op, ELEMENTWISE)
    }


def _expr(node: Node, rw: Rewriter, absorbed: set[str], args: list[str]) -> tuple[tuple, int]:
    """Expression of `node` over leaf args (appended to `args`), and its op count."""
    count, subs = 1, []
    for name in node.inputs:
        producer = rw.producer(name) if name in absorbed else None
        if producer is None:
            if name not in args:
                args.append(name)
            subs.append(("arg", args.index(name)))
            continue
        sub, n = _expr(producer, rw, absorbed, args)
        dtype = producer.outputs[0].type.dtype
        subs.append(sub if dtype == "float32" else ("cast", dtype, sub))
        count += n
    op = node.op
    if isinstance(op, ops.Cast):
        return ("cast", op.dtype, subs[0]), count
    if isinstance(op, ops.Unary):
        return (op.fn, subs[0]), count
    if isinstance(op, ops.Binary):
        return (op.fn, subs[0], subs[1]), count
    const = ("const", op.scalar)
    return ((op.fn, const, subs[0]) if op.scalar_first else (op.fn, subs[0], const)), count


def fuse_elementwise(graph: Graph) -> Graph:
    absorbed = _absorbable(graph)

    def rule(node: Node, rw: Rewriter) -> dict[str, str] | None:
        out = node.outputs[0]
        if not isinstance(node.op, ELEMENTWISE) or out.name in absorbed:
            return None
        args: list[str] = []
        expr, count = _expr(node, rw, absorbed, args)
        fused = ops.FusedElementwise(expr, out.type.dtype)
        if count < 2 or fused.infer(*(rw.type_of(a) for a in args))[0] != out.type:
            return None
        return {out.name: rw.add(fused, *args)[0]}

    return rewrite(graph, rule)
