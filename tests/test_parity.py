"""End to end: compiled artifacts decode exactly what transformers decodes (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, hf_greedy, tiny_model

import kiln
from compiler.frontend.loader import load_model
from compiler.pipeline import run_pipeline
from runtime.batch import build_batch
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec

GREEDY = kiln.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def artifacts(tiny_dirs, tmp_path_factory):
    out = {}
    for family, src in tiny_dirs.items():
        out[family] = kiln.compile(src, tmp_path_factory.mktemp("art") / family)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_greedy_equals_transformers(family, artifacts):
    model = tiny_model(family)
    model.config._attn_implementation = "sdpa"
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (1, 6, 19, 41)]
    # a small token budget: long prompts are chunked and share steps with decodes
    llm = kiln.LLM(artifacts[family], num_kv_blocks=64, max_num_batched_tokens=16)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(model, prompt)
        assert out.outputs[0].finish_reason == "length"
    assert (
        llm.engine.scheduler.block_manager.num_free_blocks
        + (llm.engine.scheduler.block_manager.num_evictable_blocks)
        == llm.engine.scheduler.block_manager.num_total_blocks
    )


@pytest.fixture(scope="module")
def smollm2(smollm2_artifact):
    return load_model("builtin:smollm2", torch.float32), smollm2_artifact


@pytest.mark.slow
def test_smollm2_gguf_greedy_equals_transformers(smollm2):
    loaded, path = smollm2
    model, tok = loaded.model, loaded.tokenizer
    model.config._attn_implementation = "sdpa"
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    ]
    llm = kiln.LLM(path, max_num_batched_tokens=24)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        ids = tok.encode(prompt)
        assert out.prompt_token_ids == ids
        assert out.token_ids == hf_greedy(model, ids)
        assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert "Paris" in outs[0].text


@pytest.mark.slow
def test_a_stop_tokens_text_is_output_only_when_asked(smollm2_artifact):
    llm = kiln.LLM(smollm2_artifact, num_kv_blocks=64)
    prompt = "Count: 1, 2, 3,"
    base = llm.generate([prompt], kiln.SamplingParams(max_tokens=8, temperature=0.0))[0]
    j = next(j for j in range(2, 8) if base.token_ids[j] not in base.token_ids[:j])
    stop = base.token_ids[j]
    left, kept = (
        llm.generate([prompt], kiln.SamplingParams(max_tokens=8, temperature=0.0,
                     stop_token_ids=[stop], include_stop_str_in_output=include))[0].outputs[0]
        for include in (False, True)
    )  # fmt: skip
    for out in (left, kept):
        assert (out.token_ids, out.finish_reason, out.stop_reason) == (base.token_ids[: j + 1],
                                                                        "stop", stop)  # fmt: skip
    assert base.text.startswith(kept.text) and kept.text.startswith(left.text)
    assert kept.text[len(left.text) :] == llm.tokenizer.decode([stop])


@pytest.mark.slow
def test_smollm2_last_token_logits_agree(smollm2):
    loaded, path = smollm2
    art = kiln.LLM(path).engine.artifact
    prompts = [loaded.tokenizer.encode(p) for p in ("Hello there", "1, 2, 3, 4,")]
    graph, params = art.graph, art.params
    kv = allocate_kv_cache(kv_cache_spec(graph), 8, 16)
    batch = build_batch([(p, 0, [i * 4, i * 4 + 1]) for i, p in enumerate(prompts)], 16)
    logits = Executor(graph, params).forward(batch, kv)
    for i, p in enumerate(prompts):
        with torch.no_grad():
            ref = loaded.model(torch.tensor([p])).logits[0, -1]
        # fp32 over 30 layers of differently blocked matmuls: ~1e-5 relative on logits ~20
        torch.testing.assert_close(logits[i], ref, atol=1e-3, rtol=1e-4)


def test_run_pipeline_is_deterministic():
    model = tiny_model("qwen2")
    from compiler.frontend import trace_model
    from ir import print_graph

    a, _ = run_pipeline(*trace_model(model))
    b, _ = run_pipeline(*trace_model(model))
    assert print_graph(a) == print_graph(b)
