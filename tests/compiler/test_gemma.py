"""Gemma, Gemma2 and Gemma3 (text) compile with no code of their own and decode what
transformers decodes (fp32, CPU).

What sets them apart, all of it traced: embeddings scaled by sqrt(hidden) (a buffer of the
embedding module), (1 + w) RMSNorms weighted in float32 and cast back with type_as, a tanh-GELU
gated MLP, attention scaled by query_pre_attn_scalar**-0.5 instead of head_dim**-0.5, and
(Gemma2) norms after attention and MLP too, attention-logit and final-logit soft-capping,
sliding-window layers alternating with global ones; (Gemma3) per-head q/k norms applied after
the heads move, and a rope of its own base on the sliding layers.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, run_batch
from gemma_models import GEMMA, LOGITS_ATOL, WINDOW, gemma_model, reference
from transformers import AutoConfig

import kiln
from compiler.frontend import trace_model
from compiler.frontend.loader import UnsupportedModelError, check_config
from compiler.pipeline import CUDA_PASSES, run_pipeline, run_target_passes
from ir.ops import AddRMSNorm, PagedAttention, RMSNorm

GREEDY = kiln.SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", list(GEMMA))
def test_compiled_graph_matches_transformers(family, tied):
    model = gemma_model(family, tie_word_embeddings=tied)
    graph, params = run_pipeline(*trace_model(model))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (37, 5, 1, 18)]
    logits = run_batch(graph, params, prompts)
    reference(model)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("family", list(GEMMA))
def test_gemma_features_reach_the_graph(family):
    """Each layer's window, the soft-cap and Gemma's scale reach its attention op, rope fuses
    into every attention's prologue (Gemma3's q/k norms moved ahead of it), every norm is an
    RMSNorm (the (1 + w) folded into its weight), and Gemma3's sliding layers rotate by
    their own tables."""
    model = gemma_model(family)
    graph, params = run_pipeline(*trace_model(model))
    attn = [n for n in graph.nodes if isinstance(n.op, PagedAttention)]
    ops = [a.op for a in attn]
    gemma1 = family == "gemma"
    assert [a.sliding_window for a in ops] == ([None, None] if gemma1 else [WINDOW, None])
    assert {a.softcap for a in ops} == {3.0 if family == "gemma2" else None}
    assert {a.scale for a in ops} == {16**-0.5 if gemma1 else 24**-0.5}
    assert all(a.layout == "bthd" and a.rope and a.rotary_dim is None for a in ops)
    counts = graph.op_counts()
    assert not {"Rope", "Transpose", "Mean"} & set(counts)
    norms_per_layer = {"gemma": 2, "gemma2": 4, "gemma3_text": 6}[family]  # q/k norms: 2 more
    assert counts.get("RMSNorm", 0) + counts["AddRMSNorm"] == norms_per_layer * 2 + 1
    norm = model.model.layers[0].input_layernorm.weight
    weights = {n.inputs[1] for n in graph.nodes if isinstance(n.op, RMSNorm)}
    weights |= {n.inputs[2] for n in graph.nodes if isinstance(n.op, AddRMSNorm)}
    assert any(torch.equal(params[w], 1.0 + norm) for w in weights)
    tables = [a.inputs[3:] for a in attn]
    assert (tables[0] != tables[1]) == (family == "gemma3_text")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    out = {}
    for family in GEMMA:
        src = tmp_path_factory.mktemp(family)
        gemma_model(family).save_pretrained(src, safe_serialization=True)
        out[family] = kiln.compile(str(src), tmp_path_factory.mktemp("art") / family)
    return out


@pytest.mark.parametrize("family", list(GEMMA))
def test_batched_greedy_equals_transformers(family, artifacts):
    """A batch of prompts of different lengths (shorter and longer than the window), chunked
    by a small token budget so prefill chunks share steps with decodes: 32 greedy tokens
    each, equal to transformers' own generate."""
    model = reference(gemma_model(family))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 160, (n,), generator=g).tolist() for n in (1, 6, 19, 41)]
    llm = kiln.LLM(artifacts[family], num_kv_blocks=64, max_num_batched_tokens=16)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(model, prompt)
        assert out.outputs[0].finish_reason == "length"
        assert len(set(out.token_ids)) > 8  # a real check, not one token echoed 32 times


def test_the_window_and_the_caps_change_the_output():
    """The features the tests above check are not idle at these sizes: without the sliding
    window, or without either soft-cap, transformers' own logits move by far more than the
    tolerance."""
    prompt = torch.randint(0, 160, (37,), generator=torch.Generator().manual_seed(1))[None]
    model = reference(gemma_model("gemma2"))
    with torch.no_grad():
        base = model(prompt).logits[0, -1]
        for field in ("sliding_window", "attn_logit_softcapping", "final_logit_softcapping"):
            changed = reference(gemma_model("gemma2"))
            setattr(changed.config, field, 1000 if field == "sliding_window" else None)
            for layer in changed.model.layers:
                attn = layer.self_attn
                attn.sliding_window = changed.config.sliding_window if attn.sliding_window else None
                attn.attn_logit_softcapping = changed.config.attn_logit_softcapping
            assert (changed(prompt).logits[0, -1] - base).abs().max() > 100 * LOGITS_ATOL, field


@pytest.mark.parametrize("family", list(GEMMA))
def test_every_attention_gets_its_kernels_on_cuda(family):
    """bf16 for the cuda target: every attention in layout "bthd" (the kernels' own; the
    reference attention reads the batch back to the host, which a decode CUDA graph cannot
    capture), and every norm a kernel."""
    from codegen.plan import kernel_plan
    from codegen.registry import BuildConstants

    model = gemma_model(family).to(torch.bfloat16)
    graph = run_target_passes(run_pipeline(*trace_model(model))[0], CUDA_PASSES, None)
    plan = kernel_plan(graph, BuildConstants())
    kinds = (PagedAttention, RMSNorm)
    covered = {i for i, n in enumerate(graph.nodes) if isinstance(n.op, kinds)}
    assert len(covered) > 2 and covered <= set(plan)


@pytest.mark.slow  # ~30 s: every kernel of the model through NVVM and nvJitLink
def test_gemma3_compiles_for_the_cuda_target_without_a_gpu(tmp_path):
    """`kiln compile --target cuda --arch sm_90` of a tiny Gemma3 (sliding and global layers,
    q/k norms, local rope) writes cubin and PTX for every kernel; no GPU needed."""
    import json
    import os
    import subprocess
    import sys

    try:
        from cuda.pathfinder import load_nvidia_dynamic_lib

        for lib in ("nvvm", "nvJitLink"):
            load_nvidia_dynamic_lib(lib)
    except Exception as e:  # any failure to find the libraries means: not installed
        pytest.skip(f"CUDA toolchain (NVVM, nvJitLink) not found: {e}")
    gemma_model("gemma3_text").save_pretrained(tmp_path / "src", safe_serialization=True)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}  # a compiler
    args = ["compile", str(tmp_path / "src"), "-o", str(tmp_path / "art")]
    args += ["--target", "cuda", "--arch", "sm_90"]
    code = "import sys; from kiln.cli import main; sys.exit(main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    kernels = manifest["kernels"]
    assert manifest["target"] == "cuda" and kernels["arch"] == "sm_90"
    families = {name.rsplit("_", 1)[0] for name in kernels["kernels"]}
    assert {"rmsnorm", "rope_kv_cache_write", "paged_attention", "fused_elementwise"} <= families
    for name in kernels["kernels"]:
        assert (tmp_path / "art" / "kernels" / f"{name}.cubin").read_bytes()[:4] == b"\x7fELF"


def test_bidirectional_and_dynamic_rope_gemma3_are_refused():
    config = AutoConfig.for_model("gemma3_text", use_bidirectional_attention=True)
    with pytest.raises(UnsupportedModelError, match="bidirectional attention"):
        check_config(config)
    dynamic = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}
    rope = {**GEMMA["gemma3_text"]["rope_parameters"], "full_attention": dynamic}
    config = AutoConfig.for_model("gemma3_text", rope_parameters=rope)
    with pytest.raises(UnsupportedModelError, match="dynamic rope scaling"):
        check_config(config)
