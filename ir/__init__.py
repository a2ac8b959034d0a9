"""Kiln IR: a typed SSA graph of tensor ops with symbolic token/batch dimensions."""

from ir.graph import Graph, Input, Node, Value
from ir.ops import OPS, Op
from ir.printer import print_graph
from ir.serialize import graph_from_json, graph_to_json
from ir.types import Dim, TensorType
from ir.verify import VerifyError, verify

__all__ = [
    "OPS",
    "Dim",
    "Graph",
    "Input",
    "Node",
    "Op",
    "TensorType",
    "Value",
    "VerifyError",
    "graph_from_json",
    "graph_to_json",
    "print_graph",
    "verify",
]
