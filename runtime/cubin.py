"""Launch an artifact's precompiled cubins: no Numba compilation at serving time.

The kernel builders are still consulted for launch geometry (grids, scratch shapes); their
Numba dispatchers are created but never compiled, and each kernel's name (a hash of every
constant it was built from) must equal the name compiled into the artifact.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import numpy as np
import torch

from codegen.aot import array_abi_values
from codegen.cuda.launch import param_view
from codegen.plan import codegen_digest, kernel_plan
from codegen.registry import BuildConstants, Gemm, OpKernels, Param, Sizes
from compiler.artifact import Artifact, ArtifactError
from ir.ops import PagedAttention
from ir.reference import TORCH_DTYPES, concrete_shape

log = logging.getLogger(__name__)


def check_kernels(artifact: Artifact, device: torch.device) -> None:
    """The artifact holds cubins for this GPU's arch, built by this code generator."""
    kernels = artifact.manifest.get("kernels")
    if not kernels:
        raise ArtifactError(
            f"{artifact.path} was compiled for target {artifact.manifest.get('target')!r}, "
            "which has no GPU kernels; recompile with --target cuda"
        )
    major, minor = torch.cuda.get_device_capability(device)
    here = f"sm_{major}{minor}"
    if kernels["arch"] != here:
        raise ArtifactError(
            f"{artifact.path} holds kernels for {kernels['arch']} but this GPU is {here}; "
            f"recompile with: kiln compile ... --target cuda --arch {here}"
        )
    if kernels.get("codegen") != codegen_digest():
        raise ArtifactError(
            f"{artifact.path}: its kernels were built by another version of kiln's code "
            "generator; recompile the artifact"
        )


class CubinOp:
    """The kernels of one node, loaded from cubin, launched on torch's current stream."""

    def __init__(self, kernels: OpKernels, functions: dict) -> None:
        from cuda.core import LaunchConfig, launch

        self.kernels = kernels
        self.functions = {k.name: functions[k.name] for k in kernels.generated}
        self._launch, self._config = launch, LaunchConfig

    def __call__(
        self, sizes: Sizes, tensors: Mapping[str, torch.Tensor], steps: tuple | None = None
    ) -> None:
        """Launch `steps` (default: the kernels' steps at these sizes) on the bound tensors."""
        stream = _stream(torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
        for kernel in self.kernels.steps(sizes) if steps is None else steps:
            if isinstance(kernel, Gemm):
                kernel(tensors)
                continue
            args: list[int] = []
            for p in kernel.params:
                args += abi_values(tensors[p.name], p)
            config = self._config(grid=kernel.grid(sizes), block=kernel.block)
            self._launch(stream, config, self.functions[kernel.name], *np.array(args, np.int64))


@functools.lru_cache(maxsize=16)
def _stream(device: int, handle: int):
    """cuda.core's view of a CUDA stream (torch's current one), made once per stream (the
    default stream's handle is 0 on every device)."""
    from cuda.core import Stream

    return Stream.from_handle(handle)


def abi_values(t: torch.Tensor, param: Param) -> tuple[int, ...]:
    t = param_view(t, param)
    return array_abi_values(t.data_ptr(), t.shape, t.stride(), t.element_size())


def load_cubin_ops(artifact: Artifact, device: torch.device) -> dict[int, CubinOp]:
    """Node index -> its loaded kernels; raises ArtifactError when the artifact is stale."""
    from cuda.core import Device, ObjectCode

    check_kernels(artifact, device)
    Device(device.index or 0).set_current()
    section = artifact.manifest["kernels"]
    plan = kernel_plan(artifact.graph, BuildConstants(block_size=artifact.manifest["block_size"]))
    expected = {int(i): names for i, names in section["nodes"].items()}
    if {i: [k.name for k in ks.generated] for i, ks in plan.items()} != expected:
        raise ArtifactError(
            f"{artifact.path}: its kernels do not match this version of kiln's code generator; "
            "recompile the artifact"
        )
    functions = {}
    for name, meta in section["kernels"].items():
        cubin = (artifact.path / "kernels" / f"{name}.cubin").read_bytes()
        functions[name] = ObjectCode.from_cubin(cubin).get_kernel(meta["symbol"])
    log.info("loaded %d precompiled kernels for %s", len(functions), section["arch"])
    return {i: CubinOp(kernels, functions) for i, kernels in plan.items()}


def kernel_node_fn(node, run: CubinOp):
    """An executor step (same signature as a reference op) that launches `run` for `node`."""
    params = [p for k in run.kernels.generated for p in k.params]
    contiguous = {p.name for p in params if p.layout == "C"}
    wanted = {p.name for p in params}
    batch_fields = [n for n in ("slot_mapping", "query_start", "context_lens", "block_tables")
                    if n in wanted]  # fmt: skip
    layer = node.op.layer if isinstance(node.op, PagedAttention) else None
    outs = [(v.type, TORCH_DTYPES[v.type.dtype]) for v in node.outputs]
    scratch = [(s, TORCH_DTYPES[s.dtype]) for s in run.kernels.scratch]

    def fn(op, ctx, *args):
        device = next(a.device for a in args if a is not None)
        tensors = {}
        for i, a in enumerate(args):
            name = f"in{i}"
            tensors[name] = a.contiguous() if name in contiguous else a
        results = [
            torch.empty(concrete_shape(t, ctx.sizes), dtype=d, device=device) for t, d in outs
        ]
        tensors.update((f"out{i}", r) for i, r in enumerate(results))
        if layer is not None:
            tensors["k_cache"], tensors["v_cache"] = ctx.kv_caches[layer]
        for name in batch_fields:
            tensors[name] = getattr(ctx, name)
        steps = run.kernels.steps(ctx.sizes)
        used = OpKernels.names(steps)
        for s, dtype in scratch:
            if s.name in used:
                tensors[s.name] = torch.empty(s.shape(ctx.sizes), dtype=dtype, device=device)
        run(ctx.sizes, tensors, steps)
        return tuple(results) if len(results) > 1 else results[0]

    return fn
