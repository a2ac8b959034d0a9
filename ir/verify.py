"""Graph verifier: SSA form, types re-inferred from the op rules, outputs defined."""

from __future__ import annotations

from ir.graph import Graph


class VerifyError(ValueError):
    pass


def verify(graph: Graph, after: str = "") -> Graph:
    """Check `graph` and return it; raise VerifyError naming the first broken node."""
    where = f" after {after}" if after else ""
    defined: dict = {}
    for inp in graph.inputs:
        _define(defined, inp.value.name, inp.value.type, where)
    for i, node in enumerate(graph.nodes):
        label = f"node {i} ({type(node.op).__name__} -> {[v.name for v in node.outputs]}){where}"
        missing = [n for n in node.inputs if n is not None and n not in defined]
        if missing:
            raise VerifyError(f"{label}: uses undefined values {missing}")
        try:
            inferred = node.op.infer(*(defined[n] if n else None for n in node.inputs))
        except (ValueError, TypeError, IndexError) as e:
            raise VerifyError(f"{label}: {e}") from e
        declared = tuple(v.type for v in node.outputs)
        if tuple(inferred) != declared:
            raise VerifyError(f"{label}: declared {declared}, inferred {tuple(inferred)}")
        for v in node.outputs:
            _define(defined, v.name, v.type, label)
    for name in graph.outputs:
        if name not in defined:
            raise VerifyError(f"graph output {name!r} is not defined{where}")
    return graph


def _define(defined: dict, name: str, type_, where: str) -> None:
    if name in defined:
        raise VerifyError(f"value {name!r} defined twice ({where})")
    defined[name] = type_
