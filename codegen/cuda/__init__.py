"""CUDA kernel families; importing this package registers every builder."""

from codegen.cuda import (
    attention,
    elementwise,
    embedding,
    gather,
    layernorm,
    norm_linear,
    quant_linear,
    rmsnorm,
    silu_mul,
)

__all__ = [
    "attention",
    "elementwise",
    "embedding",
    "gather",
    "layernorm",
    "norm_linear",
    "quant_linear",
    "rmsnorm",
    "silu_mul",
]
