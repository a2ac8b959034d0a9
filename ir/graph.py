"""Graph, nodes and values: an immutable, topologically ordered SSA program."""

from __future__ import annotations

from dataclasses import dataclass, field

from ir.ops import Op
from ir.types import TensorType


@dataclass(frozen=True, slots=True)
class Value:
    name: str
    type: TensorType


@dataclass(frozen=True, slots=True)
class Input:
    """A graph input: a runtime tensor (kind "input") or a named weight (kind "param")."""

    value: Value
    kind: str = "input"

    def __post_init__(self) -> None:
        if self.kind not in ("input", "param"):
            raise ValueError(f"unknown input kind {self.kind!r}")


@dataclass(frozen=True, slots=True)
class Node:
    op: Op
    inputs: tuple[str | None, ...]  # value names; None marks an absent optional operand
    outputs: tuple[Value, ...]


@dataclass(frozen=True, slots=True)
class Graph:
    inputs: tuple[Input, ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    _types: dict[str, TensorType] = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        types = {i.value.name: i.value.type for i in self.inputs}
        for n in self.nodes:
            types.update((v.name, v.type) for v in n.outputs)
        object.__setattr__(self, "_types", types)

    def type_of(self, name: str) -> TensorType:
        return self._types[name]

    @property
    def params(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.kind == "param")

    @property
    def runtime_inputs(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.kind == "input")

    def producers(self) -> dict[str, Node]:
        return {v.name: n for n in self.nodes for v in n.outputs}

    def users(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for name in n.inputs:
                if name is not None:
                    users.setdefault(name, []).append(n)
        return users

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[type(n.op).__name__] = counts.get(type(n.op).__name__, 0) + 1
        return dict(sorted(counts.items()))
