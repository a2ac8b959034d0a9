"""JSON round-trip of graphs; loading validates every field and never evaluates code."""

from __future__ import annotations

import json
from dataclasses import fields

from ir.graph import Graph, Input, Node, Value
from ir.ops import OPS
from ir.types import TensorType
from ir.verify import verify

FORMAT = 1


def graph_to_json(graph: Graph) -> str:
    doc = {
        "format": FORMAT,
        "inputs": [{"kind": i.kind, **_value(i.value)} for i in graph.inputs],
        "nodes": [
            {
                "op": type(n.op).__name__,
                "attrs": {f.name: getattr(n.op, f.name) for f in fields(n.op)},
                "inputs": list(n.inputs),
                "outputs": [_value(v) for v in n.outputs],
            }
            for n in graph.nodes
        ],
        "outputs": list(graph.outputs),
    }
    return json.dumps(doc, indent=1)


def graph_from_json(text: str) -> Graph:
    doc = json.loads(text)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"graph.json: unsupported format (expected {FORMAT})")
    inputs = tuple(Input(_load_value(i), i["kind"]) for i in doc["inputs"])
    nodes = tuple(_load_node(n) for n in doc["nodes"])
    return verify(Graph(inputs, nodes, tuple(str(o) for o in doc["outputs"])))


def _value(v: Value) -> dict:
    return {"name": v.name, "shape": list(v.type.shape), "dtype": v.type.dtype}


def _load_value(d: dict) -> Value:
    return Value(str(d["name"]), TensorType(tuple(d["shape"]), str(d["dtype"])))


def _load_node(d: dict) -> Node:
    cls = OPS.get(d["op"])
    if cls is None:
        raise ValueError(f"graph.json: unknown op {d['op']!r}")
    names = {f.name for f in fields(cls)}
    if set(d["attrs"]) - names:
        raise ValueError(f"graph.json: unknown attributes {set(d['attrs']) - names} of {d['op']}")
    op = cls(**{k: _tuples(v) for k, v in d["attrs"].items()})
    inputs = tuple(None if n is None else str(n) for n in d["inputs"])
    return Node(op, inputs, tuple(_load_value(v) for v in d["outputs"]))


def _tuples(x):
    return tuple(_tuples(e) for e in x) if isinstance(x, list) else x
