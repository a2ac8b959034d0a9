"""Ahead-of-time kernels for the cuda target: every kernel the graph needs, as cubin + PTX."""

from __future__ import annotations

from tqdm import tqdm

from codegen.aot import compile_kernel
from codegen.plan import codegen_digest, kernel_plan
from codegen.registry import BuildConstants
from ir.graph import Graph


def compile_graph_kernels(
    graph: Graph, arch: str, block_size: int
) -> tuple[dict, dict[str, bytes]]:
    """(manifest section, artifact files) for the graph's kernels, built for `arch`.

    Each distinct kernel (names hash every constant it is built from) is compiled once;
    the manifest maps node indices to the kernels they launch, in order.
    """
    plan = kernel_plan(graph, BuildConstants(block_size=block_size))
    unique = {k.name: k for kernels in plan.values() for k in kernels.generated}
    files: dict[str, bytes] = {}
    metadata: dict[str, dict] = {}
    for name, kernel in tqdm(unique.items(), desc="cuda kernels", unit="kernel"):
        compiled = compile_kernel(kernel, arch)
        files[f"kernels/{name}.cubin"] = compiled.cubin
        files[f"kernels/{name}.ptx"] = compiled.ptx.encode()
        metadata[name] = compiled.metadata()
    first = next(iter(metadata.values()), {})
    section = {
        "arch": arch,
        "codegen": codegen_digest(),
        "ptx_isa": first.get("ptx_isa"),
        "toolkit": first.get("toolkit"),
        "nvjitlink": first.get("nvjitlink"),
        "kernels": metadata,
        "nodes": {str(i): [k.name for k in kernels.generated] for i, kernels in plan.items()},
    }
    return section, files
