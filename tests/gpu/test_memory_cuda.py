"""The KV cache is sized from a measured start-up profile, inside gpu_memory_utilization."""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from benchmarks.models import in_memory_artifact, random_model

    model = random_model("qwen3-0.6b", num_hidden_layers=4)
    return in_memory_artifact(model, "qwen3-0.6b", tmp_path_factory.mktemp("mem"))


def test_the_largest_step_stays_inside_the_measured_profile(artifact):
    import kiln
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.memory import kv_cache_bytes

    config = EngineConfig(gpu_memory_utilization=0.5, max_num_batched_tokens=4096)
    engine = Engine(artifact, config)
    runner, p = engine.runner, engine.runner.memory_profile
    weights = sum(t.numel() * t.element_size() for t in runner.params.values())
    kv = runner.num_blocks * runner.block_size * runner.spec.bytes_per_token
    print(f"profile: {p.describe()}; KV cache {kv / 2**30:.2f} GiB of {p.total / 2**30:.1f}")
    assert abs(p.weights - weights) < 0.05 * weights + (64 << 20)  # weights and buffers
    assert 0 < p.activations < 4 << 30
    assert kv <= kv_cache_bytes(p, 0.5) < kv + runner.block_size * runner.spec.bytes_per_token
    # a full-budget prefill, sampled with filters and logprobs, its prompt scored (prompt
    # logprobs: logits for every token): no more than the profile said
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    params = kiln.SamplingParams(
        max_tokens=2, top_p=0.9, top_k=40, logprobs=5, prompt_logprobs=20, ignore_eos=True
    )
    for i in range(4):
        engine.add_request(str(i), list(range(7 + i, 1031 + i)), params)
    while engine.has_unfinished():
        engine.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    print(f"serving peak above the resting engine: {peak / 2**20:.0f} MiB")
    assert peak <= p.activations * 1.05
    engine.close()


def test_the_decode_graphs_fit_in_the_margin_left_outside_the_share(artifact, caplog):
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    engine = Engine(artifact, EngineConfig(gpu_memory_utilization=0.9, max_num_seqs=256))
    graphs, total = engine.runner.graphs, engine.runner.memory_profile.total
    print(f"decode CUDA graphs ({len(graphs.graphs)}): {graphs.memory / 2**20:.0f} MiB")
    assert 0 < graphs.memory < 0.1 * total
    assert "CUDA graphs took" not in caplog.text
    engine.close()


def test_less_free_memory_than_the_share_is_refused_at_start(artifact):
    from runtime.config import EngineConfig
    from runtime.engine import Engine
    from runtime.memory import MemoryBudgetError

    gc.collect()
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    hog = torch.empty(free - int(0.4 * total), dtype=torch.uint8, device="cuda")  # 40% left
    try:
        with pytest.raises(MemoryBudgetError, match="were free at start-up"):
            Engine(artifact, EngineConfig(gpu_memory_utilization=0.6))
    finally:
        del hog
        torch.cuda.empty_cache()
