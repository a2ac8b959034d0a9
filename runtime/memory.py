"""How much GPU memory the KV cache gets, vLLM's way.

`gpu_memory_utilization` is the share of the GPU's total memory this engine may use: its
weights, the activations of the largest step (measured by running one), memory outside
torch's allocator (CUDA context, cuBLAS workspaces, loaded kernels, NCCL) and the KV cache,
which takes the rest. The CUDA graphs, captured after the cache is allocated, live in
the remaining (1 - gpu_memory_utilization) margin: their capture measures what they take,
and a warning says when it is more. Another process's memory is not this
engine's to take: when less than the requested share is free at start-up, the engine refuses
to start instead of running out of memory later.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


class MemoryBudgetError(ValueError):
    """The requested share of the GPU cannot hold the engine."""


@dataclass(frozen=True, slots=True)
class MemoryProfile:
    """Bytes, measured on the device at start-up."""

    total: int  # the device's memory
    free_at_start: int  # free before this engine allocated anything
    weights: int
    activations: int  # peak of the largest step above the weights (with its sampling)
    non_torch: int  # taken outside torch's allocator since start-up

    def describe(self) -> str:
        parts = ("weights", "activations", "non_torch")
        return ", ".join(f"{p.replace('_', '-')} {getattr(self, p) / GIB:.2f} GiB" for p in parts)


def kv_cache_bytes(profile: MemoryProfile, utilization: float) -> int:
    """The KV cache's share: what `utilization` of the device leaves after the rest."""
    requested = int(profile.total * utilization)
    if profile.free_at_start < requested:
        raise MemoryBudgetError(
            f"--gpu-memory-utilization {utilization} asks for {requested / GIB:.1f} GiB of "
            f"the GPU's {profile.total / GIB:.1f} GiB, but only "
            f"{profile.free_at_start / GIB:.1f} GiB were free at start-up (other processes "
            "hold the rest): lower it, or free the GPU"
        )
    kv = requested - profile.weights - profile.activations - profile.non_torch
    if kv <= 0:
        raise MemoryBudgetError(
            f"no room for a KV cache in the {requested / GIB:.1f} GiB that "
            f"--gpu-memory-utilization {utilization} allows ({profile.describe()}): raise it, "
            "or lower --max-num-batched-tokens or --max-num-seqs"
        )
    return kv


def graphs_outside_margin(profile: MemoryProfile, utilization: float, graphs: int) -> str | None:
    """What to say when the CUDA graphs (`graphs` bytes) take more than the margin
    the share leaves; None when they fit in it."""
    margin = profile.total * (1 - utilization)
    if graphs <= margin:
        return None
    return (
        f"the CUDA graphs took {graphs / GIB:.2f} GiB, more than the {margin / GIB:.2f} "
        f"GiB that --gpu-memory-utilization {utilization} leaves outside the engine's share: "
        "lower it, lower --max-num-seqs or --max-num-batched-tokens (fewer graphs), or pass "
        "--decode-graphs-only or --enforce-eager"
    )
