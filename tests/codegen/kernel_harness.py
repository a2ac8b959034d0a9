"""Shared pieces of the kernel tests: simulator setup, tolerances, poisoned outputs, launches.

Without a GPU the kernels run under the Numba CUDA simulator. NUMBA_ENABLE_CUDASIM is read
once, when numba.cuda is first imported, so it is set here, before this module imports
codegen; every test module here imports this one first. It holds for the whole pytest
process, which is safe while no other test directory imports numba. (A conftest.py here
would shadow tests/conftest.py, which other test modules import as `conftest`.) The AOT
test compiles in a subprocess with the variable removed: the simulator has no compiler.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import codegen.cuda  # noqa: F401 (registers the builders)
from codegen.cuda.launch import launch
from codegen.numba_shim import CUDASIM
from codegen.registry import BuildConstants, OpKernels, build_kernels
from ir.reference import DTYPE_NAMES, TORCH_DTYPES
from ir.types import TensorType

_SHARED_LOCK = threading.Lock()


def _locked_shared_array(self, shape, dtype, alignment=None):
    """numba-cuda's simulated `cuda.shared.array`, with its lookup and store under one lock.

    The simulator runs a block's threads as Python threads that share one allocation per
    source line. Its own method looks the line up and stores a new array without a lock, so
    two threads of a block's first pass can each get their own "shared" array and the kernel
    computes garbage (seen as rare failures under load). Same semantics otherwise: size 0 is
    the dynamic shared buffer; static arrays are keyed by the caller's (file, line).
    """
    if alignment is not None:
        raise RuntimeError("Array alignment is not supported in cudasim")
    if isinstance(dtype, kernelapi.types.Type):
        dtype = kernelapi.numpy_support.as_dtype(dtype)
    if shape == 0:
        count = self._dynshared_size // dtype.itemsize
        return np.frombuffer(self._dynshared.data, dtype=dtype, count=count)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    with _SHARED_LOCK:
        if key not in self._allocations:
            self._allocations[key] = np.empty(shape, dtype)
        return self._allocations[key]


if CUDASIM:
    from numba.cuda.simulator import kernelapi

    kernelapi.FakeCUDAShared.array = _locked_shared_array

FLOATS = ("float32", "float16", "bfloat16")

# (atol, rtol) against the reference, which runs the same dtype on the CPU.
# float32: sums run in another order (tree reductions, online softmax): a few ulp.
# float16 / bfloat16: a float32 result a few ulp off can round to the neighbouring value of
# the narrow dtype: one ulp of it (2^-10 and 2^-7 relative), with headroom for values near 0.
TOLERANCE = {
    "float32": (1e-5, 1e-5),
    "float16": (2e-3, 2e-3),
    "bfloat16": (2e-2, 1.6e-2),
}


def assert_matches(
    actual: torch.Tensor, expected: torch.Tensor, equal_nan: bool = False, like: str | None = None
) -> None:
    """Compare within the tolerance of expected's dtype, or of `like` when that is looser."""
    atol, rtol = TOLERANCE.get(like or DTYPE_NAMES[expected.dtype], (0, 0))
    torch.testing.assert_close(
        actual.cpu(), expected.cpu(), atol=atol, rtol=rtol, equal_nan=equal_nan
    )


def rand(*shape: int, dtype: str = "float32", device: str = "cpu") -> torch.Tensor:
    return torch.randn(*shape).to(TORCH_DTYPES[dtype]).to(device)


def poisoned(shape: tuple[int, ...], dtype: str, device: str = "cpu") -> torch.Tensor:
    """An output buffer full of NaN (or a sentinel for integers): unwritten elements show."""
    torch_dtype = TORCH_DTYPES[dtype]
    fill = float("nan") if torch_dtype.is_floating_point else -7
    return torch.full(shape, fill, dtype=torch_dtype, device=device)


def typed(t: torch.Tensor, symbolic: dict[int, str] | None = None) -> TensorType:
    """TensorType of t, with the dimensions in `symbolic` ({axis: "T"}) left symbolic."""
    shape = tuple((symbolic or {}).get(i, d) for i, d in enumerate(t.shape))
    return TensorType(shape, DTYPE_NAMES[t.dtype])


def gpu_test(fn: Callable) -> Callable:
    """Mark a test `gpu` (selected by `pytest -m gpu`); skip it where torch sees no GPU."""
    no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(no_gpu(fn))


@contextmanager
def _short_switch_interval() -> Iterator[None]:
    """The simulator runs each CUDA thread as a Python thread and polls them all; a short
    GIL switch interval makes that several times faster."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def launch_kernels(kernels: OpKernels, sizes: dict[str, int], tensors: Mapping) -> None:
    with _short_switch_interval():
        launch(kernels, sizes, tensors)


def run_kernels(
    op,
    inputs: list[torch.Tensor],
    outputs: list[torch.Tensor],
    sizes: dict[str, int],
    types: tuple[TensorType, ...],
    consts: BuildConstants = BuildConstants(),  # noqa: B008
    **extra: torch.Tensor,
) -> OpKernels:
    """Build the op's kernels for `types` and run them on inputs -> outputs."""
    kernels = build_kernels(op, types, consts)
    tensors = {f"in{i}": t for i, t in enumerate(inputs)}
    tensors |= {f"out{i}": t for i, t in enumerate(outputs)}
    launch_kernels(kernels, sizes, {**tensors, **extra})
    return kernels
