"""Stable text form of a graph (used by IR dumps and by before/expected pass tests)."""

from __future__ import annotations

from dataclasses import fields

from ir.graph import Graph, Node


def format_op(op) -> str:
    attrs = ", ".join(f"{f.name}={getattr(op, f.name)!r}" for f in fields(op))
    return f"{type(op).__name__}({attrs})" if attrs else type(op).__name__


def format_node(node: Node) -> str:
    outs = ", ".join(f"%{v.name}: {v.type}" for v in node.outputs)
    args = ", ".join("_" if n is None else f"%{n}" for n in node.inputs)
    return f"{outs} = {format_op(node.op)}({args})"


def print_graph(graph: Graph) -> str:
    lines = [f"input %{i.value.name}: {i.value.type}  # {i.kind}" for i in graph.inputs]
    lines += [format_node(n) for n in graph.nodes]
    lines.append("return " + ", ".join(f"%{n}" for n in graph.outputs))
    return "\n".join(lines) + "\n"
