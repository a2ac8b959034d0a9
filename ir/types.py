"""Tensor types with symbolic dimensions ("T": tokens in the flat batch, "B": sequences)."""

from __future__ import annotations

import math
from dataclasses import dataclass

Dim = int | str
SYMBOLS = ("T", "B")
DTYPES = ("float32", "bfloat16", "float16", "int64", "int32", "bool", "float8_e4m3fn")
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}")
        for d in self.shape:
            if not (isinstance(d, int) and d >= 0) and d not in SYMBOLS:
                raise ValueError(f"bad dimension {d!r} in {self.shape}")

    @property
    def rank(self) -> int:
        return len(self.shape)

    def with_shape(self, shape: tuple[Dim, ...]) -> TensorType:
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


def numel(shape: tuple[Dim, ...]) -> tuple[int, tuple[str, ...]]:
    """Element count as (constant factor, sorted symbolic factors)."""
    const = math.prod(d for d in shape if isinstance(d, int))
    return const, tuple(sorted(d for d in shape if isinstance(d, str)))


def normalize_dim(dim: int, rank: int) -> int:
    if not -rank <= dim < max(rank, 1):
        raise ValueError(f"dimension {dim} out of range for rank {rank}")
    return dim % rank if rank else 0


def broadcast(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Numpy broadcasting over possibly symbolic dimensions."""
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == 1 or x == y:
            out.append(y)
        elif y == 1:
            out.append(x)
        else:
            raise ValueError(f"cannot broadcast {a} with {b}")
    return tuple(reversed(out))


def promote(a: str, b: str) -> str:
    """Result dtype of a binary op (torch's rule restricted to our dtypes)."""
    if a == b:
        return a
    order = ("bool", "int32", "int64", "float16", "bfloat16", "float32")
    if {a, b} == {"float16", "bfloat16"}:
        return "float32"
    return max(a, b, key=order.index)
