"""The pass pipeline: the order is the documentation."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from compiler.passes.canonicalize import canonicalize
from compiler.passes.cse import cse
from compiler.passes.dce import eliminate_dead_code
from compiler.passes.fold_constants import fold_constants
from compiler.passes.fuse_add_rmsnorm import fuse_add_rmsnorm
from compiler.passes.fuse_elementwise import fuse_elementwise
from compiler.passes.fuse_norm_linear import fuse_norm_linear
from compiler.passes.fuse_rope_attention import fuse_rope_attention
from compiler.passes.merge_projections import merge_projections
from compiler.passes.raise_rmsnorm import raise_rmsnorm
from compiler.passes.raise_rope import raise_rope
from compiler.passes.raise_silu_mul import raise_silu_mul
from ir.graph import Graph
from ir.printer import print_graph
from ir.verify import verify

log = logging.getLogger(__name__)
Pass = Callable[[Graph], Graph]

PIPELINE: tuple[Pass, ...] = (
    canonicalize,  # casts/views/identity arithmetic from tracing into one normal form
    eliminate_dead_code,  # the tracer's unused shape bookkeeping
    cse,  # per-layer copies of the rope-table views
    raise_rmsnorm,  # pow/mean/rsqrt/mul -> RMSNorm
    raise_rope,  # rotate-half -> Rope
    raise_silu_mul,  # silu(a) * b -> SiluMul
    merge_projections,  # q/k/v and gate/up share their input: one GEMM each
    fuse_rope_attention,  # rope + layout transposes into the attention prologue
    fuse_add_rmsnorm,  # residual add + the next norm
    fuse_elementwise,  # what is left of elementwise chains
    eliminate_dead_code,  # interiors of everything raised or fused above
)

# the cuda target's, on each rank's graph (after sharding): fusions its kernels implement
CUDA_PASSES: tuple[Pass, ...] = (
    fuse_norm_linear,  # each block of a one-token GEMV normalizes its input itself
    eliminate_dead_code,  # the norms and projections fused above
)


def run_target_passes(graph: Graph, passes: tuple[Pass, ...], dump_dir: Path | None) -> Graph:
    """Passes after folding and sharding (verifying after each): pure graph rewrites."""
    for p in passes:
        graph = verify(p(graph), after=p.__name__)
        log.debug("%s: %s", p.__name__, graph.op_counts())
        if dump_dir:
            (dump_dir / f"target_{p.__name__}.ir").write_text(print_graph(graph))
    return graph


def run_pipeline(
    graph: Graph,
    params: dict[str, torch.Tensor],
    passes: tuple[Pass, ...] = PIPELINE,
    dump_dir: Path | None = None,
) -> tuple[Graph, dict[str, torch.Tensor]]:
    """Run the passes (verifying after each), then fold params-only nodes into new params."""
    if dump_dir:
        dump_dir.mkdir(parents=True, exist_ok=True)
        (dump_dir / "00_trace.ir").write_text(print_graph(graph))
    for i, p in enumerate(passes, start=1):
        graph = verify(p(graph), after=p.__name__)
        log.debug("%s: %s", p.__name__, graph.op_counts())
        if dump_dir:
            (dump_dir / f"{i:02d}_{p.__name__}.ir").write_text(print_graph(graph))
    graph, params = fold_constants(graph, params)
    graph = verify(graph, after="fold_constants")
    if dump_dir:
        (dump_dir / f"{len(passes) + 1:02d}_fold_constants.ir").write_text(print_graph(graph))
    return graph, params
