"""Launch an artifact's precompiled cubins: no Numba compilation at serving time.

The kernel builders are still consulted for launch geometry (grids, scratch shapes); their
Numba dispatchers are created but never compiled, and each kernel's name (a hash of every
constant it was built from) must equal the name compiled into the artifact.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from codegen.aot import array_abi_values
from codegen.cuda.launch import param_view
from codegen.plan import codegen_digest, kernel_plan
from codegen.registry import BuildConstants, Gemm, OpKernels, Param, Sizes
from compiler.artifact import Artifact, ArtifactError
from ir.ops import PagedAttention
from ir.reference import TORCH_DTYPES, concrete_shape

log = logging.getLogger(__name__)
ITEMSIZE = {name: dtype.itemsize for name, dtype in TORCH_DTYPES.items()}
PLAIN_NAME = re.compile(r"\w[\w.-]*", re.ASCII)  # a kernel name, as a file name in kernels/


def check_kernels(artifact: Artifact, device: torch.device) -> None:
    """The artifact holds a well-formed kernels section, with cubins for this GPU's arch built
    by this code generator."""
    kernels = artifact.manifest.get("kernels")
    if not kernels:
        raise ArtifactError(
            f"{artifact.path} was compiled for target {artifact.manifest.get('target')!r}, "
            "which has no GPU kernels; recompile with --target cuda"
        )
    if not isinstance(kernels, dict) or not isinstance(kernels.get("arch"), str):
        raise _malformed(artifact.path, "'kernels' is not an object with an 'arch' string")
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
    _check_section(artifact.path, kernels)


def _check_section(path: Path, section: dict) -> None:
    """The section's 'kernels' maps names to metadata with a 'symbol', and its 'nodes' map
    node indices to lists of those names."""
    kernels = section.get("kernels")
    if not isinstance(kernels, dict):
        raise _malformed(path, "'kernels.kernels' is missing or not an object")
    for name, meta in kernels.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("symbol"), str):
            raise _malformed(path, f"kernel {name!r} has no 'symbol' string")
    nodes = section.get("nodes")
    if not isinstance(nodes, dict):
        raise _malformed(path, "'kernels.nodes' is missing or not an object")
    for index, names in nodes.items():
        if not (
            index.isdecimal()
            and isinstance(names, list)
            and all(isinstance(n, str) and n in kernels for n in names)
        ):
            raise _malformed(path, f"node {index!r} does not list the section's kernels")


def _malformed(path: Path, what: str) -> ArtifactError:
    return ArtifactError(f"{path}/manifest.json: {what}; recompile")


def cubin_paths(artifact: Artifact) -> dict[str, Path]:
    """Kernel name -> its cubin, for each kernel of the (checked) kernels section: a plain
    file name, whose kernels/{name}.cubin is among the manifest's checksummed files."""
    files = artifact.manifest.get("files")
    if not isinstance(files, dict):
        raise _malformed(artifact.path, "it lists no checksummed files")
    paths = {}
    for name in artifact.manifest["kernels"]["kernels"]:
        if not PLAIN_NAME.fullmatch(name):
            raise _malformed(artifact.path, f"kernel name {name!r} is not a plain file name")
        rel = f"kernels/{name}.cubin"
        if rel not in files:
            raise _malformed(artifact.path, f"{rel} is not among its checksummed files")
        paths[name] = artifact.path / rel
    return paths


def load_kernel(artifact: Artifact, cubin: Path, meta: dict):
    """The kernel `meta` names, loaded from `cubin` by the driver; ArtifactError when the
    driver refuses it (a toolkit newer than the driver supports, mostly)."""
    from cuda.core import ObjectCode

    code = cubin.read_bytes()
    try:
        return ObjectCode.from_cubin(code).get_kernel(meta["symbol"])
    except Exception as e:  # cuda.core's CUDAError, which it does not export
        arch = artifact.manifest["kernels"]["arch"]
        raise ArtifactError(
            f"{artifact.path}: this GPU driver could not load the artifact's kernels (built by "
            f"CUDA toolkit {meta.get('toolkit')}, PTX ISA {meta.get('ptx_isa')}, nvJitLink "
            f"{meta.get('nvjitlink')}): {e}; recompile with: kiln compile ... --target cuda "
            f"--arch {arch} on a machine whose CUDA toolkit this driver supports"
        ) from e


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
            # cuda.core passes a Python int as one 8-byte value: every ABI field is one
            self._launch(stream, config, self.functions[kernel.name], *args)


@functools.lru_cache(maxsize=16)
def _stream(device: int, handle: int):
    """cuda.core's view of a CUDA stream (torch's current one), made once per stream (the
    default stream's handle is 0 on every device)."""
    from cuda.core import Stream

    return Stream.from_handle(handle)


def abi_values(t: torch.Tensor, param: Param) -> tuple[int, ...]:
    """The ABI values of param_view(t, param), read off t's address, sizes and strides:
    making the view would cost more host time than the launch it feeds. Where no view of t
    is what the kernel sees (dimensions that do not merge, words that do not fit),
    param_view decides."""
    found = _abi_values(
        t.data_ptr(), t.shape, t.stride(), t.element_size(), param.ndim, param.dtype
    )
    return _viewed(t, param) if found is None else found


@functools.lru_cache(maxsize=4096)  # a step's arguments mostly live where the last step's did
def _abi_values(
    ptr: int, shape: tuple[int, ...], strides: tuple[int, ...], size: int, ndim: int, dtype: str
) -> tuple[int, ...] | None:
    lead = len(shape) - ndim + 1  # dimensions merged into the first
    if lead < 1:
        return None
    if lead > 1:
        merged = _merged(shape[:lead], strides[:lead])
        if merged is None:
            return None
        shape, strides = (merged[0], *shape[lead:]), (merged[1], *strides[lead:])
    wanted = ITEMSIZE[dtype]
    if wanted != size:  # elements read as words of another width: the last dimension scales
        last = shape[-1] * size
        if (
            strides[-1] != 1
            or (ptr | last) % wanted
            or any(s * size % wanted for s in strides[:-1])
        ):
            return None
        shape = (*shape[:-1], last // wanted)
        strides = (*(s * size // wanted for s in strides[:-1]), 1)
    return array_abi_values(ptr, shape, strides, wanted)


def _merged(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """(size, stride) of these dimensions as one, or None when they are not one run of
    equally spaced elements (a dimension of size 1 has no spacing of its own)."""
    dims = [(n, s) for n, s in zip(shape, strides, strict=True) if n != 1]
    for (_, outer), (n, inner) in itertools.pairwise(dims):
        if outer != inner * n:
            return None
    return math.prod(shape), dims[-1][1] if dims else strides[-1]


def _viewed(t: torch.Tensor, param: Param) -> tuple[int, ...]:
    t = param_view(t, param)
    return array_abi_values(t.data_ptr(), t.shape, t.stride(), t.element_size())


def load_cubin_ops(artifact: Artifact, device: torch.device) -> dict[int, CubinOp]:
    """Node index -> its loaded kernels; raises ArtifactError when the artifact is stale."""
    from cuda.core import Device

    check_kernels(artifact, device)
    paths = cubin_paths(artifact)
    Device(device.index or 0).set_current()
    section = artifact.manifest["kernels"]
    plan = kernel_plan(artifact.graph, BuildConstants(block_size=artifact.manifest["block_size"]))
    expected = {int(i): names for i, names in section["nodes"].items()}
    if {i: [k.name for k in ks.generated] for i, ks in plan.items()} != expected:
        raise ArtifactError(
            f"{artifact.path}: its kernels do not match this version of kiln's code generator; "
            "recompile the artifact"
        )
    functions = {
        name: load_kernel(artifact, path, section["kernels"][name]) for name, path in paths.items()
    }
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
