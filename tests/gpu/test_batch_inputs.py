"""Eager-step inputs travel through pinned host memory and equal the CPU build."""

from __future__ import annotations

import pytest
import torch

from runtime.batch import BatchInputs, build_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

FIELDS = [
    f for f in BatchInputs.__dataclass_fields__ if f not in ("max_context_len", "max_query_len")
]


def test_cuda_batch_equals_cpu_batch():
    chunks = [([5, 6, 7], 0, [3, 9]), ([8], 20, [1, 4]), ([1, 2], 5, [7])]
    sample = [True, False, True]
    cpu = build_batch(chunks, 16, sample, device="cpu")
    gpu = build_batch(chunks, 16, sample, device="cuda")
    for name in FIELDS:
        on_cpu, on_gpu = getattr(cpu, name), getattr(gpu, name)
        assert on_gpu.is_cuda and on_gpu.dtype == on_cpu.dtype, name
        assert torch.equal(on_gpu.cpu(), on_cpu), name
    assert cpu.block_tables.tolist() == [[3, 9], [1, 4], [7, 0]]
    assert cpu.logits_indices.tolist() == [2, 5]
    assert (gpu.max_context_len, gpu.max_query_len) == (21, 3)
