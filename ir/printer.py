"""Stable text form of a graph (used by IR dumps and by before/expected pass tests)."""

from __future__ import annotations

from dataclasses import fields

from ir.graph import Graph, Node


def format_op(op) -> str:
    attrs = ", ".join(f"{f.name}={getattr(op, f.name)!r}" for f in fields(op))
    return f"{type(op).__name__}({attrs})" if attrs else type(op).__name__


def format_node(node: Node, names: dict[str, str]) -> str:
    outs = ", ".join(f"%{names.get(v.name, v.name)}: {v.type}" for v in node.outputs)
    args = ", ".join("_" if n is None else f"%{names.get(n, n)}" for n in node.inputs)
    return f"{outs} = {format_op(node.op)}({args})"


def print_graph(graph: Graph, numbered: bool = False) -> str:
    """Text form; `numbered` renames node outputs %0, %1, ... in order (for comparisons)."""
    names: dict[str, str] = {}
    if numbered:
        for n in graph.nodes:
            names.update((v.name, str(len(names))) for v in n.outputs)
    lines = [f"input %{i.value.name}: {i.value.type}  # {i.kind}" for i in graph.inputs]
    lines += [format_node(n, names) for n in graph.nodes]
    lines.append("return " + ", ".join(f"%{names.get(n, n)}" for n in graph.outputs))
    return "\n".join(lines) + "\n"
