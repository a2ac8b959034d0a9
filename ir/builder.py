"""GraphBuilder: append ops with fresh SSA names and types inferred from the op rules."""

from __future__ import annotations

from ir.graph import Graph, Input, Node, Value
from ir.types import TensorType


class GraphBuilder:
    def __init__(self, inputs: tuple[Input, ...] = (), taken: set[str] | None = None) -> None:
        self.inputs: list[Input] = list(inputs)
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {i.value.name: i.value.type for i in inputs}
        self.producer: dict[str, Node] = {}
        self.taken: set[str] = set(self.types) | (taken or set())
        self.counter = 0

    def fresh(self, hint: str = "v") -> str:
        name = hint
        while name in self.taken:
            self.counter += 1
            name = f"{hint}_{self.counter}"
        self.taken.add(name)
        return name

    def input(self, name: str, type_: TensorType, kind: str = "input") -> str:
        if name in self.types:
            raise ValueError(f"input {name!r} defined twice")
        self.taken.add(name)
        self.inputs.append(Input(Value(name, type_), kind))
        self.types[name] = type_
        return name

    def add(self, op, *inputs: str | None, names: tuple[str, ...] = ()) -> tuple[str, ...]:
        """Append `op` over `inputs`; returns the names of its outputs."""
        out_types = op.infer(*(self.types[n] if n else None for n in inputs))
        hint = type(op).__name__.lower()
        names = names or tuple(self.fresh(hint) for _ in out_types)
        outs = tuple(Value(n, t) for n, t in zip(names, out_types, strict=True))
        self.emit(Node(op, tuple(inputs), outs))
        return names

    def add1(self, op, *inputs: str | None, name: str | None = None) -> str:
        return self.add(op, *inputs, names=(name,) if name else ())[0]

    def emit(self, node: Node) -> None:
        """Append an existing node unchanged (its names must be unused)."""
        self.nodes.append(node)
        for v in node.outputs:
            self.types[v.name] = v.type
            self.taken.add(v.name)
            self.producer[v.name] = node

    def build(self, outputs: tuple[str, ...]) -> Graph:
        return Graph(tuple(self.inputs), tuple(self.nodes), tuple(outputs))
