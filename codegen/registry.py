"""Kernel registry: (op type, target) -> builder of the kernels that run one op.

A builder takes (op, input TensorTypes, BuildConstants) and returns OpKernels: the steps to
run in order (kernels, each specialized on the op's compile-time constants, and library GEMMs)
and the scratch buffers they share. Every kernel argument is a tensor; its Param names what
the runner binds to it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ir.types import Dim, TensorType

# "T" (tokens), "B" (logits rows: sampled sequences, then scored prompt tokens) and, for
# attention, "seqs" (sequences), "max_context_len" and "max_query_len"
Sizes = Mapping[str, int]
Grid = Callable[[Sizes], tuple[int, ...]]

BATCH_FIELDS = ("slot_mapping", "query_start", "context_lens", "block_tables")


@dataclass(frozen=True, slots=True)
class Param:
    """One kernel argument and what the runner binds to it.

    name: "in<i>" (the op's i-th input), "out<i>" (its i-th output), a batch field (see
    BATCH_FIELDS), "k_cache"/"v_cache" (the op's layer), or one of the op's Scratch names.
    A tensor of higher rank than `ndim` is viewed with its leading dimensions merged into one.
    layout "C" needs a contiguous tensor; "A" takes any strides (views straight off the graph).
    """

    name: str
    dtype: str
    ndim: int
    layout: str = "C"


# where each token's sequence, its context and its cache blocks are: what attention reads
SEQUENCE_PARAMS = (
    Param("query_start", "int32", 1),
    Param("context_lens", "int32", 1),
    Param("block_tables", "int32", 2),
)


@dataclass(frozen=True, slots=True)
class Kernel:
    """One launch: fn[grid(sizes), block](*params); skipped when `when(sizes)` is false.

    Equal names mean equal code (the name hashes every constant the kernel is built from),
    so an artifact stores each distinct kernel once.
    """

    name: str
    fn: Any  # numba CUDA dispatcher (a simulator kernel under NUMBA_ENABLE_CUDASIM)
    params: tuple[Param, ...]
    block: tuple[int, ...]
    grid: Grid
    when: Callable[[Sizes], bool] | None = None


@dataclass(frozen=True, slots=True)
class Gemm:
    """A library step between an op's kernels: out = a @ b.T through torch (cuBLAS), with
    a and out seen as [rows, last dim]; names bind as Params' do. No generated code."""

    out: str
    a: str
    b: str
    when: Callable[[Sizes], bool] | None = None

    def __call__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        a, out = tensors[self.a], tensors[self.out]
        torch.mm(a.reshape(-1, a.shape[-1]), tensors[self.b].t(), out=out.view(-1, out.shape[-1]))


@dataclass(frozen=True, slots=True)
class Scratch:
    """A temporary buffer the op's kernels pass between them, allocated by the runner."""

    name: str
    dtype: str
    shape: Callable[[Sizes], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class OpKernels:
    """The steps of one op in launch order (generated kernels and library GEMMs) and the
    scratch buffers they pass between them."""

    kernels: tuple[Kernel | Gemm, ...]
    scratch: tuple[Scratch, ...] = ()

    @property
    def generated(self) -> tuple[Kernel, ...]:
        """The kernels with code to compile (every step but the library calls)."""
        return tuple(k for k in self.kernels if isinstance(k, Kernel))

    def steps(self, sizes: Sizes) -> tuple[Kernel | Gemm, ...]:
        """The steps that run at these sizes, in launch order (every launcher runs these)."""
        return tuple(k for k in self.kernels if k.when is None or k.when(sizes))

    def bound(self, sizes: Sizes) -> set[str]:
        """The names the steps that run at these sizes bind (scratch nobody binds is not
        allocated: a one-row NormLinear needs none of its general path's buffers)."""
        return self.names(self.steps(sizes))

    @staticmethod
    def names(steps: tuple[Kernel | Gemm, ...]) -> set[str]:
        """The names these steps bind."""
        names: set[str] = set()
        for k in steps:
            names |= {k.out, k.a, k.b} if isinstance(k, Gemm) else {p.name for p in k.params}
        return names


@dataclass(frozen=True, slots=True)
class BuildConstants:
    """Compile-time constants that do not live on the op."""

    block_size: int = 16  # tokens per KV-cache block
    # blocks a decode attention launch aims for: a few tokens' contexts are split (split-K)
    # until T x kv heads x splits reaches it, many tokens' are not split at all
    attn_blocks: int = 2048
    # keys the longest context's splits hold at the fewest: a lone sequence's shorter splits
    # cost the reduce more than they save (W3's 1280-key launch: 20 splits, not 40)
    attn_split_keys: int = 64
    # words of key rows (as many of value rows) a lane of decode attention loads before it
    # uses any: more loads in flight, against more registers (fewer blocks per SM)
    attn_load_words: int = 8
    # blocks a one-row NormLinear GEMV aims for: two on each of the H200's 132 SMs
    gemv_blocks: int = 264
    # rows (tokens) up to which a QuantLinear runs its fused dequant GEMV, which reads the
    # packed weights once but holds an accumulator a row in each lane and reads x once a
    # weight word a row; more rows dequantize the weight into a buffer and call cuBLAS,
    # whose tensor cores win once a weight element serves enough rows
    quant_gemv_rows: int = 8
    # prefill attention on tensor cores (mma) where the dtype and head size allow it; False
    # keeps the CUDA-core kernel (a baseline for the benchmarks)
    prefill_tensor_cores: bool = True


Builder = Callable[[Any, tuple[TensorType, ...], BuildConstants], OpKernels]
KERNEL_BUILDERS: dict[tuple[type, str], Builder] = {}


def kernel_for(op_type: type, target: str = "cuda") -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        key = (op_type, target)
        if key in KERNEL_BUILDERS:
            raise ValueError(f"kernel builder for {op_type.__name__} on {target} registered twice")
        KERNEL_BUILDERS[key] = builder
        return builder

    return register


def build_kernels(
    op: Any,
    inputs: tuple[TensorType, ...],
    consts: BuildConstants = BuildConstants(),
    target: str = "cuda",
) -> OpKernels:
    builder = KERNEL_BUILDERS.get((type(op), target))
    if builder is None:
        raise KeyError(f"no {target} kernel for {type(op).__name__}")
    return builder(op, tuple(inputs), consts)


def kernel_name(family: str, *key: object) -> str:
    """Readable family name plus a hash of everything the kernel is specialized on."""
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
    return f"{family}_{digest}"


def concrete(shape: tuple[Dim, ...], sizes: Sizes) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in shape)


def num_rows(t: TensorType, sizes: Sizes) -> int:
    """Rows of t seen as [rows, last dim]."""
    return math.prod(concrete(t.shape[:-1], sizes))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
