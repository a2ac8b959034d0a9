"""Launch an op's kernels on torch tensors bound by parameter name (eager, through numba)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from codegen.numba_shim import cuda
from codegen.registry import Gemm, Kernel, OpKernels, Param, Scratch, Sizes
from ir.reference import TORCH_DTYPES


def param_view(t: torch.Tensor, param: Param) -> torch.Tensor:
    """t as `param` sees it, with no copy: leading dimensions merged down to param.ndim, and
    elements narrower than param.dtype's read as words of it (a bf16 cache as int64: 4 a load).
    The numba launch below and the cubin launcher (runtime/cubin.py) both bind through it."""
    if t.dim() > param.ndim:  # merge leading dims: [1, T, H, D] -> [T, H, D] for ndim 3
        t = t.reshape(-1, *t.shape[t.dim() - param.ndim + 1 :]) if param.ndim > 1 else t.reshape(-1)
    wanted = TORCH_DTYPES[param.dtype]
    return t.view(wanted) if wanted.itemsize != t.element_size() else t


def as_kernel_arg(t: torch.Tensor, param: Param):
    """The array the kernel sees: param_view(t), bf16 as int16 bits."""
    t = param_view(t, param)
    if param.layout == "C" and not t.is_contiguous():
        raise ValueError(f"kernel argument {param.name} must be contiguous")
    if not t.is_cuda:  # host arrays travel as one block (layout "A" params are inputs only)
        t = t.contiguous()
    if t.dtype != TORCH_DTYPES[param.dtype]:
        raise TypeError(f"kernel argument {param.name}: {t.dtype}, expected {param.dtype}")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    # CPU tensors go in as numpy arrays: the simulator runs on them, a real GPU copies them.
    return cuda.as_cuda_array(t) if t.is_cuda else t.numpy()


def allocate_scratch(
    scratch: Iterable[Scratch], sizes: Sizes, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Scratch buffers for these sizes (a CUDA-graph runner allocates them once, at the most)."""
    return {
        s.name: torch.empty(s.shape(sizes), dtype=TORCH_DTYPES[s.dtype], device=device)
        for s in scratch
    }


def launch(
    kernels: OpKernels,
    sizes: Sizes,
    tensors: Mapping[str, torch.Tensor],
    steps: tuple[Kernel | Gemm, ...] | None = None,
) -> None:
    """Run every kernel of one op in order, on torch's current stream for CUDA tensors.

    `tensors` maps Param names ("in0", "out0", "k_cache", batch fields...) to tensors;
    scratch buffers missing from it are allocated here. `steps`: the kernels' steps at these
    sizes, when the caller has chosen them already.
    """
    device = next(iter(tensors.values())).device
    steps = kernels.steps(sizes) if steps is None else steps
    used = OpKernels.names(steps)
    missing = [s for s in kernels.scratch if s.name not in tensors and s.name in used]
    env = {**allocate_scratch(missing, sizes, device), **tensors}
    stream = 0
    if device.type == "cuda":
        stream = cuda.external_stream(torch.cuda.current_stream().cuda_stream)
    for k in steps:
        if isinstance(k, Gemm):
            k(env)
        else:
            args = [as_kernel_arg(env[p.name], p) for p in k.params]
            k.fn[k.grid(sizes), k.block, stream](*args)
