"""Custom architectures: a plain torch module, attention through kiln.attention, compiled."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from custom_decoder import (
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    VOCAB,
    ParallelDecoder,
    TinyDecoder,
    decoder,
    eager_greedy,
)
from torch import nn

import kiln
from compiler.artifact import load_artifact
from compiler.frontend.loader import UnsupportedModelError
from ir import ops
from runtime.batch import build_batch
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("custom") / "art"
    eos = [3, VOCAB + 4]
    return kiln.compile(decoder(), out, max_model_len=128, name="tiny-decoder", eos_token_ids=eos)


def test_attention_is_causal_gqa_attention_in_eager_torch():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(11, h, 8, generator=g) for h in (6, 2, 2))
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    torch.testing.assert_close(kiln.attention(q, k, v, layer=0), ref, rtol=1e-5, atol=1e-5)


def test_custom_module_is_optimized_like_a_transformers_model(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    arch = manifest["architecture"]
    assert arch["model_type"] == "tiny-decoder" and arch["architectures"] == ["TinyDecoder"]
    assert (arch["num_layers"], arch["num_heads"], arch["num_kv_heads"]) == (3, HEADS, KV_HEADS)
    assert (arch["hidden_size"], arch["vocab_size"], arch["tie_word_embeddings"]) == (
        HIDDEN,
        VOCAB,
        False,
    )
    assert manifest["max_model_len"] == 128
    assert manifest["eos_token_ids"] == [3]  # VOCAB + 4 is past the logits: never sampled
    assert manifest["source"] == "module:TinyDecoder"
    after = manifest["op_counts"]["after"]
    # the hand-written norms, rope, SwiGLU and projections were recognized and fused
    assert after["PagedAttention"] == 3 and after["SiluMul"] == 3
    assert after["RMSNorm"] + after.get("AddRMSNorm", 0) == 7
    assert after["Linear"] == 3 * 4 + 1  # merged QKV, merged gate/up, o, down; the head
    assert "Rope" not in after  # fused into the attention op


def test_batched_greedy_equals_the_module_itself(artifact):
    model = decoder()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 7, 20, 37)]
    params = kiln.SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    # a small token budget: long prompts are chunked and share steps with decodes
    with kiln.LLM(artifact, num_kv_blocks=48, max_num_batched_tokens=16) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == eager_greedy(model, prompt, 24)


def test_logits_match_the_module(artifact):
    """Two sequences in one flat batch: each gets its own logits, as the module alone gives."""
    art = load_artifact(artifact)
    executor = Executor(art.graph, art.params)
    kv = allocate_kv_cache(kv_cache_spec(art.graph), 4, art.manifest["block_size"])
    a, b = (torch.arange(n) * 7 % VOCAB for n in (19, 5))
    batch = build_batch([(a.tolist(), 0, [0, 1]), (b.tolist(), 0, [2])], 16)
    model = decoder()
    with torch.no_grad():
        want = [model(x, torch.arange(len(x)), torch.tensor([len(x) - 1])) for x in (a, b)]
    got = executor.forward(batch, kv)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_rms_norm_modules(dtype, tmp_path):
    """torch.nn.RMSNorm in the blocks, a weightless one with torch's default eps before the
    head: in float32 the module's greedy tokens; in bf16 its logits to rounding
    (torch's rms_norm scales in float32 and rounds once)."""

    class TorchNorms(TinyDecoder):
        def __init__(self) -> None:
            super().__init__(layers=2)
            for block in self.blocks:
                block.attn_norm, block.mlp_norm = nn.RMSNorm(HIDDEN, 1e-6), nn.RMSNorm(HIDDEN)
                for norm in (block.attn_norm, block.mlp_norm):
                    nn.init.normal_(norm.weight, 1.0, 0.1)
            self.norm = nn.RMSNorm(HIDDEN, elementwise_affine=False)

    model = decoder(cls=TorchNorms).to(dtype)
    art = kiln.compile(model, tmp_path / "art", max_model_len=64)
    after = json.loads((art / "manifest.json").read_text())["op_counts"]["after"]
    assert after.get("RMSNorm", 0) + after.get("AddRMSNorm", 0) == 5
    # eps None: torch's, float32's epsilon in every dtype here (it computes in float32)
    loaded = load_artifact(art)
    eps = {n.op.eps for n in loaded.graph.nodes if isinstance(n.op, ops.RMSNorm | ops.AddRMSNorm)}
    assert eps == {1e-6, torch.finfo(torch.float32).eps}
    prompt = list(range(10, 33))
    if dtype == torch.float32:
        params = kiln.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
        with kiln.LLM(art, num_kv_blocks=16) as llm:
            (out,) = llm.generate([prompt], params, use_tqdm=False)
        assert out.token_ids == eager_greedy(model, prompt, 10)
        return
    kv = allocate_kv_cache(kv_cache_spec(loaded.graph), 4, loaded.manifest["block_size"])
    got = Executor(loaded.graph, loaded.params).forward(build_batch([(prompt, 0, [0, 1])], 16), kv)
    x = torch.tensor(prompt)
    with torch.no_grad():
        want = model(x, torch.arange(len(x)), torch.tensor([len(x) - 1]))
    torch.testing.assert_close(got, want, rtol=0, atol=0.05 * want.float().std().item())


def test_custom_module_shards_over_two_ranks(tmp_path):
    """Its [T, hidden] activations reshape straight to [1, T, heads, D]: the shard pass
    follows the split heads through the unit dim the module never had."""
    art = kiln.compile(decoder(), tmp_path / "tp2", max_model_len=64, tensor_parallel_size=2)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    params = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    with kiln.LLM(art, num_kv_blocks=16) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    model = decoder()
    assert [o.token_ids for o in outs] == [eager_greedy(model, p, 8) for p in prompts]


def test_a_logit_softcap_after_the_lm_head_shards(tmp_path):
    """tanh capping the logits (elementwise ops of the LM head's output alone): the head
    stays whole on every rank, no logits to gather."""
    model = decoder(layers=2, logit_softcap=2.0)
    art = kiln.compile(model, tmp_path / "art", max_model_len=64, tensor_parallel_size=2)
    prompts = [[4], list(range(10, 33))]
    params = kiln.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    with kiln.LLM(art, num_kv_blocks=16, max_num_batched_tokens=16) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [eager_greedy(model, p, 10) for p in prompts]


@pytest.mark.parametrize("tp", [1, 2])
def test_a_parallel_residual_decoder(tp, tmp_path):
    """LayerNorm, learned positions, GELU; the module splits q/k/v off one Linear, which the
    compiler merges with the MLP's (one input): the two slicings become one, so it shards."""
    model = decoder(cls=ParallelDecoder)
    art = kiln.compile(model, tmp_path / "art", max_model_len=64, tensor_parallel_size=tp)
    after = json.loads((art / "manifest.json").read_text())["op_counts"]["after"]
    assert after["Linear"] == 2 * 3 + 1 and after["LayerNorm"] == 2 + 1  # [qkv|fc], o, proj
    prompts = [[4], [9, 8, 7, 6, 5, 4, 3], list(range(10, 40))]
    params = kiln.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    with kiln.LLM(art, num_kv_blocks=16, max_num_batched_tokens=16) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [eager_greedy(model, p, 10) for p in prompts]


def assert_serves_its_greedy_tokens(model, tmp_path) -> None:
    """Compiled and served (a prompt chunked next to a decode), the module's greedy tokens."""
    art = kiln.compile(model, tmp_path / "art", max_model_len=64)
    prompts = [[4], list(range(10, 33))]
    params = kiln.SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    with kiln.LLM(art, num_kv_blocks=16, max_num_batched_tokens=16) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == [eager_greedy(model, p, 10) for p in prompts]


def test_interleaved_rope_through_torch_stack(tmp_path):
    """GPT-J's rope: strided slices and torch.stack (a new dim, then a concat) convert."""
    assert_serves_its_greedy_tokens(decoder(layers=2, interleaved=True), tmp_path)


class MadeInForward(TinyDecoder):
    """Rope's frequencies from torch.arange and a per-token scale of the logits from arange,
    full, zeros and ones, made in `forward`."""

    def forward(self, token_ids, positions, logits_indices):
        exponents = torch.arange(0, HEAD_DIM, 2, device=positions.device).float() / HEAD_DIM
        self.inv_freq = 1.0 / 10000**exponents
        device = positions.device
        ramp = torch.arange(VOCAB, device=device).float() / VOCAB  # weighs later tokens up
        scale = torch.full((VOCAB,), 0.5, device=device) + ramp - torch.zeros(VOCAB, device=device)
        return super().forward(token_ids, positions, logits_indices) * (scale + torch.ones(VOCAB))


def test_tensors_made_in_forward_become_constants(tmp_path):
    assert_serves_its_greedy_tokens(decoder(layers=2, cls=MadeInForward), tmp_path)

    class OverTheTokens(TinyDecoder):
        def forward(self, token_ids, positions, logits_indices):
            steps = torch.arange(token_ids.shape[0], device=token_ids.device)
            return super().forward(token_ids, steps, logits_indices)

    with pytest.raises(ValueError, match="over the token count: take it from `positions`"):
        kiln.compile(decoder(cls=OverTheTokens), tmp_path / "b", max_model_len=64)


class Sums(TinyDecoder):
    """Sums over a token's own values (a norm written with sum, mean-centred logits) and over
    the whole step (across the tokens; integers sum to int64, or to a dtype asked for)."""

    def forward(self, token_ids, positions, logits_indices):
        for block in self.blocks:
            block.attn_norm.forward = lambda x, w=block.attn_norm.weight: (
                w * (x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / HIDDEN + 1e-6))
            )
        logits = super().forward(token_ids, positions, logits_indices)
        centred = logits - torch.sum(logits, dim=(-1,), keepdim=True) / logits.shape[-1]
        across = logits.sum() + token_ids.sum(0).float() + token_ids.sum(dtype=torch.float32)
        return centred + 0.0 * across


def test_sums_convert(tmp_path):
    model = decoder(layers=2, cls=Sums)
    art = kiln.compile(model, tmp_path / "sums", max_model_len=64)
    graph = load_artifact(art).graph
    sums = [n.op for n in graph.nodes if isinstance(n.op, ops.Sum)]
    assert len(sums) == 2 + 1 + 3  # the two norms, the logits' centre, the step-wide sums
    assert_serves_its_greedy_tokens(model, tmp_path)


def test_a_tokenizer_travels_with_the_module(tmp_path):
    from conftest import smollm2_tokenizer

    tok = smollm2_tokenizer()
    model = decoder(layers=1, vocab=len(tok))
    art = kiln.compile(model, tmp_path / "art", max_model_len=64, tokenizer=tok)
    prompt = "Kilns fire clay"
    params = kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    with kiln.LLM(art, num_kv_blocks=8) as llm:
        (out,) = llm.generate([prompt], params, use_tqdm=False)
    assert out.prompt_token_ids == tok.encode(prompt)
    assert out.token_ids == eager_greedy(model, out.prompt_token_ids, 6)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["eos_token_ids"] == [tok.eos_token_id]  # the tokenizer's, none given


def test_custom_module_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs max_model_len"):
        kiln.compile(decoder(), tmp_path / "a")
    with pytest.raises(ValueError, match="cast it"):
        kiln.compile(decoder(), tmp_path / "b", max_model_len=64, dtype="bfloat16")

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, HIDDEN)
            self.head = nn.Linear(HIDDEN, VOCAB)

        def forward(self, token_ids, positions, logits_indices):
            return self.head(self.embed(token_ids)[logits_indices])

    with pytest.raises(UnsupportedModelError, match=r"kiln\.attention in each layer"):
        kiln.compile(NoAttention(), tmp_path / "c", max_model_len=64)
    twice = decoder(layers=2)
    twice.blocks[1].layer = 0
    with pytest.raises(UnsupportedModelError, match=r"must be 0..1, each once; got \[0, 0\]"):
        kiln.compile(twice, tmp_path / "d", max_model_len=64)
    promoting = decoder(layers=1).to(torch.bfloat16)
    promoting.forward = lambda token_ids, positions, logits_indices: promoting.head(
        promoting.embed(token_ids)[logits_indices].float()  # torch itself would refuse this
    )
    with pytest.raises(ValueError, match=r"float32\[B, 48\] and weight bfloat16.* differ"):
        kiln.compile(promoting, tmp_path / "e", max_model_len=64)
    for mode, error in [
        ("all rows", r"returns float32\[T, 96\]; the logits must be \[B, vocab\]"),
        ("two outputs", "2 outputs; the logits"),
        ("two kv shapes", "layers with different KV heads or head_dim"),
        ("matmul", r"matmul other than an outer product \(use nn.Linear\)"),
    ]:
        with pytest.raises(ValueError, match=error):  # the CLI: one line, exit status 2
            kiln.compile(Odd(mode), tmp_path / "f", max_model_len=64)
    assert not any(tmp_path.iterdir())  # nothing written for a refused module


class Odd(nn.Module):
    """Self-attention over the embeddings, each layer its own head size, then the head."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, token_ids, positions, logits_indices):
        x = self.embed(token_ids)
        for layer, d in enumerate((8, 4) if self.mode == "two kv shapes" else (8, 8)):
            q = x.view(-1, 16 // d, d)
            x = x + kiln.attention(q, q, q, layer).reshape(-1, 16)
        if self.mode == "matmul":
            return x[logits_indices] @ self.head.weight.t()
        logits = self.head(x if self.mode == "all rows" else x[logits_indices])
        return (logits, logits) if self.mode == "two outputs" else logits
