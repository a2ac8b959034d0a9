"""Code generation: op -> kernel builders per target (importing codegen.cuda registers them)."""

from codegen.registry import (
    BuildConstants,
    Kernel,
    OpKernels,
    Param,
    Scratch,
    build_kernels,
    kernel_for,
)

__all__ = [
    "BuildConstants",
    "Kernel",
    "OpKernels",
    "Param",
    "Scratch",
    "build_kernels",
    "kernel_for",
]
