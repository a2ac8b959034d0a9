"""Trace + optimize every family; the compiled graph reproduces transformers' logits."""

from __future__ import annotations

import re
import types

import pytest
import torch
from conftest import FAMILIES, run_batch, tiny_model

from compiler.frontend import trace_model
from compiler.frontend.convert import UnsupportedOpError
from compiler.frontend.loader import UnsupportedModelError, check_config, load_model
from compiler.pipeline import CUDA_PASSES, run_pipeline, run_target_passes
from ir.ops import LayerNorm, PagedAttention

# fp32 end to end; the only differences are summation orders (matmul blocking, softmax)
LOGITS_ATOL = 2e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compiled_graph_matches_transformers(family):
    model = tiny_model(family)
    graph, params = run_pipeline(*trace_model(model))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (37, 5, 1, 18)]
    logits = run_batch(graph, params, prompts)
    model.config._attn_implementation = "sdpa"
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, atol=LOGITS_ATOL, rtol=0)


LAYERNORM_FAMILIES = {"phi": 1, "gpt_neox": 2, "olmo": 2}  # family -> LayerNorms per layer
PARTIAL = ("phi", "gpt_neox")  # partial rotary


@pytest.mark.parametrize("family", [f for f in FAMILIES if f not in LAYERNORM_FAMILIES])
def test_fusions_happen(family):
    graph, _ = run_pipeline(*trace_model(tiny_model(family)))
    counts = graph.op_counts()
    layers = FAMILIES[family].get("num_hidden_layers", 2)
    attn = [n.op for n in graph.nodes if isinstance(n.op, PagedAttention)]
    assert len(attn) == layers and all(a.rope and a.layout == "bthd" for a in attn)
    assert counts["AddRMSNorm"] == 2 * layers  # every norm but the first takes the residual add
    assert counts["SiluMul"] == layers
    assert counts["Linear"] == 4 * layers + 1  # qkv, o, gate_up, down per layer + lm_head
    assert "Binary" not in counts and "Mean" not in counts and "Transpose" not in counts


@pytest.mark.parametrize("family", list(LAYERNORM_FAMILIES))
def test_layernorm_families_keep_their_norms_and_lose_their_transposes(family):
    """Every LayerNorm is one node (OLMo's, weightless, with a weight of ones); rope, full or
    partial (Phi's 0.4, GPT-NeoX's 0.25 of a head), fuses into the attention."""
    model = tiny_model(family)
    graph, _ = run_pipeline(*trace_model(model))
    counts = graph.op_counts()
    layers = model.config.num_hidden_layers
    assert counts["LayerNorm"] == LAYERNORM_FAMILIES[family] * layers + 1  # + the final norm
    attn = [n.op for n in graph.nodes if isinstance(n.op, PagedAttention)]
    assert len(attn) == layers and all(a.layout == "bthd" and a.rope for a in attn)
    if family in PARTIAL:  # tiny configs: 12-wide heads, phi rotates 6 columns, GPT-NeoX 4
        assert {a.rotary_dim for a in attn} == {6 if family == "phi" else 4}
    else:
        assert all(a.rotary_dim is None for a in attn)
    assert not {"Rope", "Transpose", "Mean"} & set(counts)
    assert counts["Concat"] == 1  # the rope tables' [freqs | freqs], once for every layer


def test_scalar_minus_tensor_keeps_its_sign():
    model = tiny_model("llama")

    def mlp(self, x):  # 1 - up(x) traces to aten.rsub.Scalar(up(x), 1)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * (1 - self.up_proj(x)))

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(mlp, layer.mlp)
    assert_compiles_to_the_model(model, list(range(3, 20)))


@pytest.mark.parametrize("family", list(LAYERNORM_FAMILIES))
def test_layernorm_families_attend_and_normalize_with_kernels_on_cuda(family):
    """The cuda target's plan gives every attention its kernels (the reference attention
    reads the batch back to the host, which a decode CUDA graph cannot capture) and every
    LayerNorm its kernel."""
    from codegen.plan import kernel_plan
    from codegen.registry import BuildConstants

    model = tiny_model(family).to(torch.bfloat16)
    graph = run_target_passes(run_pipeline(*trace_model(model))[0], CUDA_PASSES, None)
    plan = kernel_plan(graph, BuildConstants())
    layers = model.config.num_hidden_layers
    attn = {i for i, n in enumerate(graph.nodes) if isinstance(n.op, PagedAttention)}
    assert len(attn) == layers and attn <= set(plan)
    norms = {i for i, n in enumerate(graph.nodes) if isinstance(n.op, LayerNorm)}
    assert len(norms) == LAYERNORM_FAMILIES[family] * layers + 1 and norms <= set(plan)
    # each norm's one kernel binds every input it has (a bias where there is one)
    for i in norms:
        given = [f"in{j}" for j, name in enumerate(graph.nodes[i].inputs) if name is not None]
        assert [p.name for k in plan[i].generated for p in k.params] == ["out0", *given]


def test_split_and_chunk_pieces_are_slices():
    model = tiny_model("llama")

    def mlp(self, x):  # split_with_sizes, split (last piece shorter), chunk (5 of 72: 15s, 12)
        gate, up = torch.cat([self.gate_proj(x), self.up_proj(x)], -1).split([72, 72], -1)
        first, second, rest = gate.split(30, -1)
        pieces = up.chunk(5, -1)
        up = torch.cat(pieces[::-1], -1)  # reordered: only the right bounds give the model
        return self.down_proj(self.act_fn(torch.cat([rest, second, first], -1)) * up)

    for layer in model.model.layers:
        layer.mlp.forward = types.MethodType(mlp, layer.mlp)
    assert_compiles_to_the_model(model, list(range(3, 20)))


def assert_compiles_to_the_model(model, prompt: list[int]) -> None:
    """The optimized graph's last-token logits equal the (patched) model's."""
    graph, params = run_pipeline(*trace_model(model))
    with torch.no_grad():
        ref = model(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(run_batch(graph, params, [prompt])[0], ref, atol=LOGITS_ATOL, rtol=0)


def test_integer_scalar_arithmetic_stays_integer():
    model = tiny_model("llama")
    embed = model.model.embed_tokens  # looks up ids + 1: int64 tensor plus a Python int
    embed.forward = types.MethodType(
        lambda self, ids: torch.nn.Embedding.forward(self, ids + 1), embed
    )
    assert_compiles_to_the_model(model, list(range(3, 40)))


def test_sliding_window_reaches_attention():
    graph, _ = trace_model(tiny_model("mistral"))
    attn = [n.op for n in graph.nodes if isinstance(n.op, PagedAttention)]
    assert {a.sliding_window for a in attn} == {24}


def test_unsupported_config_is_refused_with_a_reason():
    from transformers import AutoConfig

    moe = AutoConfig.for_model("mixtral", num_local_experts=4)
    with pytest.raises(UnsupportedModelError, match="mixture-of-experts"):
        check_config(moe)
    enc = AutoConfig.for_model("t5")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder"):
        check_config(enc)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"), "lacks weights"),
        (lambda sd: sd.pop("lm_head.weight"), "lacks weights: ['lm_head.weight']"),
        (lambda sd: sd.__setitem__("model.norm.weight", torch.ones(3)), "cannot load"),
    ],
    ids=["missing", "missing lm_head", "wrong shape"],
)
def test_checkpoints_without_every_weight_are_refused(tmp_path, edit, message):
    """transformers would initialize what is missing at random: a different model each time."""
    model = tiny_model("llama")
    assert not model.config.tie_word_embeddings
    weights = dict(model.state_dict())
    edit(weights)
    model.save_pretrained(tmp_path, state_dict=weights, safe_serialization=True)
    with pytest.raises(UnsupportedModelError, match=re.escape(message)):
        load_model(str(tmp_path), torch.float32)


def test_dynamic_rope_scaling_is_refused():
    from transformers import AutoConfig

    config = AutoConfig.for_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="dynamic rope scaling"):
        check_config(config)


def test_unconvertible_op_is_named():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = tiny_model("llama").config
            self.scale = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, position_ids, logits_to_keep, use_cache):
            logits = torch.cumsum(input_ids.float(), -1)[..., None] * self.scale
            return type("Out", (), {"logits": logits})

    with pytest.raises(UnsupportedOpError, match="cumsum"):
        trace_model(Odd())


def test_a_transformers_model_in_memory_compiles_as_its_directory(tmp_path):
    import kiln
    from compiler.artifact import load_artifact
    from ir.printer import print_graph

    model = tiny_model("qwen3")
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    from_dir = load_artifact(kiln.compile(str(tmp_path / "src"), tmp_path / "a"))
    in_memory = load_artifact(kiln.compile(model, tmp_path / "b"))
    assert in_memory.manifest["source"] == "transformers:Qwen3ForCausalLM"
    for key in ("architecture", "max_model_len", "eos_token_ids", "op_counts", "dtype"):
        assert in_memory.manifest[key] == from_dir.manifest[key], key
    assert print_graph(in_memory.graph) == print_graph(from_dir.graph)
    assert in_memory.params.keys() == from_dir.params.keys()
    assert all(torch.equal(in_memory.params[k], from_dir.params[k]) for k in from_dir.params)
    with pytest.raises(UnsupportedModelError, match="ForCausalLM"):  # no LM head
        kiln.compile(model.model, tmp_path / "c")
    with pytest.raises(ValueError, match="eos_token_ids"):  # the configs say it
        kiln.compile(model, tmp_path / "d", eos_token_ids=[1])
    with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\., dtype=\.\.\.\)"):
        kiln.compile(model, tmp_path / "e", dtype="bfloat16")
    unsaved = tiny_model("qwen3")  # from_config: its config names no architecture
    art = load_artifact(kiln.compile(unsaved, tmp_path / "f"))
    assert art.manifest["architecture"]["architectures"] == ["Qwen3ForCausalLM"]


def test_generation_config_defaults_reach_the_artifact(tmp_path):
    """Sampling defaults from generation_config.json, max_new_tokens as max_tokens (vLLM's
    reading): they become kiln.LLM's and the server's defaults."""
    import kiln

    model = tiny_model("llama")
    model.generation_config.update(max_new_tokens=7, do_sample=True, temperature=0.3, top_k=5)
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    art = kiln.compile(str(tmp_path / "src"), tmp_path / "art", max_model_len=64)
    with kiln.LLM(art, num_kv_blocks=16) as llm:
        assert llm.engine.artifact.generation_config == {
            "do_sample": True,
            "temperature": 0.3,
            "top_k": 5,
            "max_tokens": 7,
        }
        params = llm.default_params()
        # without params, each prompt's default is capped at what fits (61 + 3 = 64)
        (out,) = llm.generate([[5] * 61], use_tqdm=False)
    assert (params.max_tokens, params.temperature, params.top_k) == (7, 0.3, 5)
    assert 1 <= len(out.outputs[0].token_ids) <= 3
