"""Whether this machine can build kernels for the cuda target (no GPU needed), checked
without importing numba: the project's numba import shim must run first (codegen/numba_shim)."""

from __future__ import annotations

import importlib.util

LIBRARIES = ("nvvm", "nvrtc", "nvJitLink")  # NVIDIA's, loaded by numba-cuda and nvJitLink
INSTALL = "pip install 'kiln-llm[cuda]' (numba-cuda[cu13])"


class ToolchainError(OSError):
    """What building kernels needs is missing."""


def check_toolchain() -> None:
    """Raise ToolchainError, naming the install, unless numba-cuda and every library load."""
    try:
        from cuda.pathfinder import DynamicLibNotFoundError, load_nvidia_dynamic_lib
    except ImportError:
        load_nvidia_dynamic_lib = None
    if load_nvidia_dynamic_lib is None or importlib.util.find_spec("numba_cuda") is None:
        raise ToolchainError(f"the cuda target needs numba-cuda (no GPU needed): {INSTALL}")
    missing = []
    for lib in LIBRARIES:
        try:
            load_nvidia_dynamic_lib(lib)
        except DynamicLibNotFoundError:
            missing.append(lib)
    if missing:
        raise ToolchainError(
            f"the cuda target needs NVIDIA's {', '.join(missing)} (no GPU needed): {INSTALL}"
        )
