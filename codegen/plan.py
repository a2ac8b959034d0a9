"""Which nodes of a graph run as generated kernels, and the kernels each one launches."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import codegen.cuda  # noqa: F401  (registers every CUDA kernel builder)
from codegen.registry import KERNEL_BUILDERS, BuildConstants, OpKernels, build_kernels
from ir.graph import Graph

log = logging.getLogger(__name__)


def kernel_plan(graph: Graph, consts: BuildConstants, target: str = "cuda") -> dict[int, OpKernels]:
    """Node index -> its kernels, for every node a builder covers (others run as torch ops:
    dense GEMMs through cuBLAS, views, and shapes a builder declines)."""
    plan: dict[int, OpKernels] = {}
    for i, node in enumerate(graph.nodes):
        if (type(node.op), target) not in KERNEL_BUILDERS:
            continue
        types = tuple(graph.type_of(n) for n in node.inputs if n)
        try:
            plan[i] = build_kernels(node.op, types, consts, target)
        except (NotImplementedError, ValueError) as e:
            log.info("node %d (%s) stays a torch op: %s", i, type(node.op).__name__, e)
    return plan


def codegen_digest() -> str:
    """Hash of the code generator's source: kernels another version built must be rebuilt
    (kernel names hash the constants a kernel is built from, not its code)."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]
