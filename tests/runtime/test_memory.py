"""The KV cache's share of the GPU: what gpu_memory_utilization leaves after the rest."""

from __future__ import annotations

import pytest

from runtime.memory import (
    GIB,
    MemoryBudgetError,
    MemoryProfile,
    graphs_outside_margin,
    kv_cache_bytes,
)


def profile(**overrides) -> MemoryProfile:
    fields = dict(total=100 * GIB, free_at_start=99 * GIB, weights=10 * GIB)
    fields.update(activations=3 * GIB, non_torch=GIB)
    return MemoryProfile(**{**fields, **overrides})


def test_the_kv_cache_gets_what_the_share_leaves():
    assert kv_cache_bytes(profile(), 0.9) == 90 * GIB - 14 * GIB
    assert kv_cache_bytes(profile(), 0.5) == 50 * GIB - 14 * GIB
    # memory other processes hold is not this engine's: only the share asked for counts
    assert kv_cache_bytes(profile(free_at_start=60 * GIB), 0.5) == 36 * GIB


def test_a_share_larger_than_the_free_memory_is_refused():
    with pytest.raises(MemoryBudgetError, match=r"asks for 90\.0 GiB .* only 60\.0 GiB were free"):
        kv_cache_bytes(profile(free_at_start=60 * GIB), 0.9)


def test_no_room_for_a_kv_cache_says_what_took_it():
    with pytest.raises(MemoryBudgetError, match=r"weights 10\.00 GiB, activations 3\.00 GiB"):
        kv_cache_bytes(profile(), 0.14)
    assert issubclass(MemoryBudgetError, ValueError)  # the CLI: one line, exit status 2


def test_graphs_larger_than_the_margin_are_reported():
    assert graphs_outside_margin(profile(), 0.9, 9 * GIB) is None  # a 10 GiB margin
    warning = graphs_outside_margin(profile(), 0.95, 6 * GIB)
    assert warning.startswith("the CUDA graphs took 6.00 GiB, more than the 5.00 GiB")
    assert "--gpu-memory-utilization 0.95" in warning
