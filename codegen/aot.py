"""Ahead-of-time compilation of kernels to PTX and cubin for one arch, with no GPU needed.

numba (NVVM) makes PTX; nvJitLink assembles it into a cubin for the arch. The cubin is what an
artifact should load first: a driver refuses PTX of a newer ISA than its own (PTX from NVVM
13.5 carries ISA 9.5, which a CUDA 13.0 driver, ISA 9.0, does not accept).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

from codegen.cuda.dtypes import array_type
from codegen.numba_shim import CUDASIM, cuda
from codegen.registry import Kernel, Param

DEFAULT_ARCH = "sm_90"
# numba's kernel ABI flattens each array argument into these 8-byte fields, in this order,
# followed by ndim shape and ndim stride fields (all int64, strides in bytes).
ARRAY_FIELDS = ("meminfo", "parent", "nitems", "itemsize", "data")


@dataclass(frozen=True, slots=True)
class CompiledKernel:
    """A kernel ready to load with cuModuleLoadData / cuda.core, and how to call it."""

    name: str  # Kernel.name
    symbol: str  # entry point in the PTX and cubin
    ptx: str
    cubin: bytes
    arch: str
    ptx_isa: str  # ".version" of the PTX, e.g. "9.5"
    toolkit: str  # CUDA release of the NVVM that wrote the PTX, e.g. "13.5"
    nvjitlink: str  # version of the linker that made the cubin
    params: tuple[Param, ...]
    block: tuple[int, ...]

    def param_fields(self) -> tuple[str, ...]:
        """Names of the flat 8-byte kernel parameters, e.g. "out0.data", "out0.shape1"."""
        return tuple(f"{p.name}.{f}" for p in self.params for f in array_fields(p.ndim))

    def metadata(self) -> dict:
        """JSON-ready description for an artifact manifest (the code is stored beside it)."""
        return {
            "name": self.name,
            "symbol": self.symbol,
            "arch": self.arch,
            "ptx_isa": self.ptx_isa,
            "toolkit": self.toolkit,
            "nvjitlink": self.nvjitlink,
            "block": list(self.block),
            "params": [[p.name, p.dtype, p.ndim, p.layout] for p in self.params],
            "param_fields": list(self.param_fields()),
        }


def array_fields(ndim: int) -> tuple[str, ...]:
    return (
        *ARRAY_FIELDS,
        *(f"shape{i}" for i in range(ndim)),
        *(f"stride{i}" for i in range(ndim)),
    )


def array_abi_values(
    data_ptr: int, shape: tuple[int, ...], strides: tuple[int, ...], itemsize: int
) -> tuple[int, ...]:
    """The 8-byte values one array argument passes, in array_fields order (strides in elements)."""
    nitems = math.prod(shape)
    return (0, 0, nitems, itemsize, data_ptr, *shape, *[s * itemsize for s in strides])


def signature(kernel: Kernel) -> tuple:
    return tuple(array_type(p.dtype, p.ndim, p.layout) for p in kernel.params)


def compile_ptx(kernel: Kernel, arch: str = DEFAULT_ARCH) -> str:
    if CUDASIM:
        raise RuntimeError(
            "AOT compilation needs numba's real CUDA target: unset NUMBA_ENABLE_CUDASIM"
        )
    cc = _compute_capability(arch)
    with _target_device(cc):
        ptx, _ = cuda.compile(
            kernel.fn.py_func, signature(kernel), device=False, abi="numba", cc=cc, output="ptx"
        )
    return ptx


@contextmanager
def _target_device(cc: tuple[int, int]) -> Iterator[None]:
    """Compile device functions for `cc` rather than for the current GPU.

    numba compiles the device functions a kernel calls for the current device's compute
    capability, which needs a driver and a GPU; cuda.compile's own `cc` covers only the kernel.
    """
    from numba.cuda import dispatcher

    current = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = current


def link_cubin(ptx: str, arch: str = DEFAULT_ARCH) -> bytes:
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(1, [f"-arch={arch}"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as e:
            log = bytearray(nvjitlink.get_error_log_size(handle))
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"nvJitLink failed: {log.decode(errors='replace')}") from e
        cubin = bytearray(nvjitlink.get_linked_cubin_size(handle))
        nvjitlink.get_linked_cubin(handle, cubin)
        return bytes(cubin)
    finally:
        nvjitlink.destroy(handle)


def compile_kernel(kernel: Kernel, arch: str = DEFAULT_ARCH) -> CompiledKernel:
    from cuda.bindings import nvjitlink

    ptx = compile_ptx(kernel, arch)
    entries = re.findall(r"\.entry\s+(\S+)\s*\(", ptx)
    if len(entries) != 1:
        raise RuntimeError(f"{kernel.name}: expected one PTX entry point, found {entries}")
    n_params = len(re.findall(r"\.param\s+\.\w+\s+\S+_param_\d+", ptx))
    expected = sum(len(array_fields(p.ndim)) for p in kernel.params)
    if n_params != expected:
        raise RuntimeError(f"{kernel.name}: {n_params} PTX params, ABI expects {expected}")
    return CompiledKernel(
        name=kernel.name,
        symbol=entries[0],
        ptx=ptx,
        cubin=link_cubin(ptx, arch),
        arch=arch,
        ptx_isa=_match(r"^\.version\s+(\S+)", ptx),
        toolkit=_match(r"Cuda compilation tools, release (\d+\.\d+)", ptx),
        nvjitlink=".".join(map(str, nvjitlink.version())),
        params=kernel.params,
        block=kernel.block,
    )


def _compute_capability(arch: str) -> tuple[int, int]:
    m = re.fullmatch(r"sm_(\d+)(\d)", arch)
    if not m:
        raise ValueError(f"arch must look like sm_90, got {arch!r}")
    return int(m.group(1)), int(m.group(2))


def _match(pattern: str, text: str) -> str:
    m = re.search(pattern, text, re.MULTILINE)
    if not m:
        raise RuntimeError(f"no match for {pattern!r} in the PTX")
    return m.group(1)
