"""The rewrite driver every pass uses: walk nodes in order, let a rule replace each one.

A rule sees the node (inputs already renamed) and a Rewriter. It returns None to keep the
node, or a dict {old value name: new value name} after adding replacement nodes through
`rw.add`. Replaced nodes whose outputs nobody uses any more are left for DCE.
"""

from __future__ import annotations

from collections.abc import Callable

from ir.builder import GraphBuilder
from ir.graph import Graph, Node


class Rewriter:
    def __init__(self, graph: Graph) -> None:
        names = {v.name for n in graph.nodes for v in n.outputs}
        self.builder = GraphBuilder(graph.inputs, taken=names)
        self.users = {k: len(v) for k, v in graph.users().items()}
        for name in graph.outputs:
            self.users[name] = self.users.get(name, 0) + 1
        self.params = {i.value.name for i in graph.params}

    def producer(self, name: str | None, op_type: type | None = None) -> Node | None:
        """The node defining `name` (if it is of `op_type`, when given)."""
        node = self.builder.producer.get(name) if name else None
        if node is None or (op_type is not None and not isinstance(node.op, op_type)):
            return None
        return node

    def type_of(self, name: str):
        return self.builder.types[name]

    def single_use(self, name: str) -> bool:
        return self.users.get(name, 0) == 1

    def add(self, op, *inputs: str | None) -> tuple[str, ...]:
        return self.builder.add(op, *inputs)


Rule = Callable[[Node, Rewriter], dict[str, str] | None]


def rewrite(graph: Graph, rule: Rule) -> Graph:
    rw = Rewriter(graph)
    rename: dict[str, str] = {}
    for node in graph.nodes:
        if any(n in rename for n in node.inputs if n):
            node = Node(
                node.op, tuple(rename.get(n, n) if n else n for n in node.inputs), node.outputs
            )
        replaced = rule(node, rw)
        if replaced is None:
            rw.builder.emit(node)
        else:
            rename.update(replaced)
    return rw.builder.build(tuple(rename.get(n, n) for n in graph.outputs))
