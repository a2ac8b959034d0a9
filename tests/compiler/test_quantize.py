"""Weight quantization: the int4 and fp8 formats (ir/quant.py), the ops' type rules, the
quantize pass and its folding, compiled artifacts, tensor parallelism, and SmolLM2 in int4."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import run_batch, smollm2_tokenizer, tiny_model
from safetensors import safe_open
from test_tensor_parallel import lockstep

import kiln
from compiler.compile import CompileOptions
from compiler.frontend import trace_model
from compiler.passes.fold_constants import fold_constants
from compiler.passes.quantize import lm_head, quantize_linears
from compiler.passes.shard import shard
from compiler.pipeline import run_pipeline
from ir import ops
from ir.quant import dequantize, pack_int4, quantize, unpack_int4
from ir.types import TensorType
from ir.verify import verify
from runtime.batch import build_batch
from runtime.executor import Executor, allocate_kv_cache, kv_cache_spec

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PROMPTS = [[3, 17, 29, 4, 150, 8, 61], [90], [12, 44, 7, 7, 101, 33, 2, 5, 19, 140, 66]]


def test_int4_codes_pack_eight_to_a_word_lowest_first():
    codes = torch.arange(16, dtype=torch.int32).repeat(3, 1)  # rows of 0..15
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (3, 2)
    assert words[0, 0].item() == 0x76543210 and words[0, 1].view(torch.uint32) == 0xFEDCBA98
    g = torch.Generator().manual_seed(0)
    random_codes = torch.randint(0, 16, (13, 96), generator=g, dtype=torch.int32)
    assert torch.equal(unpack_int4(pack_int4(random_codes)), random_codes)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int4_error_is_at_most_half_a_step(dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(13, 96, generator=g) * 0.2).to(dtype)
    w[0, :32] = 0  # a group of zeros
    w[1, 5] = 0
    qweight, scales, zeros = quantize(w, "int4", 32)
    assert scales.dtype == zeros.dtype == dtype and scales.shape == (13, 3)
    assert torch.equal(zeros, zeros.round()) and zeros.min() >= 0 and zeros.max() <= 15
    back = dequantize("int4", 32, qweight, scales, zeros, torch.float32)
    step = scales.float().repeat_interleave(32, dim=1)
    # half a step, and the rounding of a code's distance from zero in the weight's dtype
    assert ((back - w.float()).abs() <= step * 0.5001 + w.float().abs() * 2**-7).all()
    assert back[0, :32].eq(0).all() and back[1, 5] == 0  # zero is a code


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fp8_keeps_three_mantissa_bits_per_row(dtype):
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(13, 40, generator=g) * torch.logspace(-3, 1, 13)[:, None]).to(dtype)
    qweight, scales = quantize(w, "fp8", 0)
    assert qweight.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    back = dequantize("fp8", 0, qweight, scales, None, torch.float32)
    largest = w.float().abs().amax(1)
    torch.testing.assert_close(back.abs().amax(1), largest, rtol=2**-4, atol=0)
    bound = torch.maximum(w.float().abs() * 2**-4, scales[:, None] * 2**-9)  # subnormals
    assert ((back - w.float()).abs() <= bound).all()


@pytest.mark.parametrize(
    "fmt, inputs, error",
    [
        ("int4", [(4, 64), (2, 8), (2, 1), (2, 1)], "do not quantize"),  # K 64: two groups
        ("int4", [(4, 64), (2, 8), (2, 2)], "wrong inputs"),  # no zeros
        ("int4", [(4, 48), (2, 8), (2, 2), (2, 2)], "does not match"),  # K 64 against x's 48
        ("fp8", [(4, 64), (2, 64), (2,), (3,)], "bias"),
    ],
)
def test_quant_linear_types_are_checked(fmt, inputs, error):
    dtypes = {"int4": ("int32", "float32", "float32"), "fp8": ("float8_e4m3fn", "float32")}
    types = [TensorType(inputs[0], "float32")]
    types += [TensorType(s, d) for s, d in zip(inputs[1:], dtypes[fmt], strict=False)]
    types += [TensorType(s, "float32") for s in inputs[1 + len(dtypes[fmt]) :]]
    with pytest.raises(ValueError, match=error):
        ops.QuantLinear(fmt, 32 if fmt == "int4" else 0).infer(*types)


def test_compile_options_refuse_bad_schemes():
    with pytest.raises(ValueError, match="unknown quantization"):
        CompileOptions(quantization="int3")
    with pytest.raises(ValueError, match="multiple of 8"):
        CompileOptions(quantization="int4", group_size=12)


@pytest.fixture(scope="module")
def optimized():
    """The tiny untied Llama after the pipeline (q/k/v and gate/up merged)."""
    return run_pipeline(*trace_model(tiny_model("llama", intermediate_size=96)))


def quantized(graph, params, fmt: str, group_size: int):
    return fold_constants(verify(quantize_linears(fmt, group_size)(graph)), params)


def dequantized_params(graph, params, fmt: str, group_size: int) -> dict[str, torch.Tensor]:
    """params with every weight the pass quantizes replaced by its dequantized self."""
    head = lm_head(graph).inputs[1]
    out = dict(params)
    for node in graph.nodes:
        w = node.inputs[1] if isinstance(node.op, ops.Linear) else None
        if w in params and w != head and params[w].shape[1] % max(group_size, 1) == 0:
            qweight, scales, *zeros = quantize(params[w], fmt, group_size)
            zero = zeros[0] if zeros else None
            out[w] = dequantize(fmt, group_size, qweight, scales, zero, params[w].dtype)
    return out


@pytest.mark.parametrize("fmt, group_size", [("int4", 16), ("fp8", 0)])
def test_pass_quantizes_every_projection_but_the_lm_head(optimized, fmt, group_size):
    graph, params = optimized
    after, packed = quantized(graph, params, fmt, group_size)
    counts = after.op_counts()
    assert counts["QuantLinear"] == 2 * 4 and counts["Linear"] == 1  # qkv, o, gate/up, down
    assert not isinstance(lm_head(after).op, ops.QuantLinear)
    assert "QuantizeWeight" not in counts  # folded into packed params
    dtypes = {t.dtype for t in packed.values()}
    assert (torch.int32 if fmt == "int4" else torch.float8_e4m3fn) in dtypes
    # exactly the logits of the unquantized graph over the dequantized weights
    expected = run_batch(graph, dequantized_params(graph, params, fmt, group_size), PROMPTS)
    logits = run_batch(after, packed, PROMPTS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    # and near the unquantized model's
    full = run_batch(graph, params, PROMPTS)
    similarity = torch.nn.functional.cosine_similarity(logits, full, dim=-1)
    assert similarity.min() > (0.99 if fmt == "fp8" else 0.95), similarity


def test_widths_the_group_does_not_divide_stay_unquantized(optimized):
    graph, params = optimized
    after, _ = quantized(graph, params, "int4", 32)  # hidden 48: only down (96 wide) divides
    assert after.op_counts()["QuantLinear"] == 2 and after.op_counts()["Linear"] == 2 * 3 + 1


def test_tensor_parallel_ranks_quantize_their_own_shards(optimized):
    """Groups never straddle a rank's cut (group 8 divides 48 / 2 and 96 / 2), so the ranks
    together compute the quantized single-rank model."""
    graph, params = optimized
    full, full_params = quantized(graph, params, "int4", 8)
    sharded, ranks = shard(graph, params, 2)
    per_rank = [quantized(sharded, p, "int4", 8) for p in ranks]
    assert per_rank[0][0].op_counts()["QuantLinear"] == 2 * 4
    caches = [allocate_kv_cache(kv_cache_spec(full), 4, 16) for _ in range(3)]
    rng = random.Random(3)
    seqs = [[rng.randrange(160) for _ in range(n)] for n in (9, 4)]
    batch = build_batch([(seqs[0], 0, [1]), (seqs[1], 0, [3])], 16)
    expected = Executor(full, full_params).forward(batch, caches[0])
    for logits in lockstep(per_rank[0][0], [p for _, p in per_rank], batch, caches[1:]):
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_quantized_artifact_stores_packed_weights_and_serves(tmp_path, fmt):
    model = tiny_model("llama", intermediate_size=96)
    out = kiln.compile(model, tmp_path / "art", quantization=fmt, group_size=16)
    manifest = json.loads((out / "manifest.json").read_text())
    group = 16 if fmt == "int4" else 0
    assert manifest["quantization"] == {"format": fmt, "group_size": group, "linears": 8}
    with safe_open(next((out / "weights").glob("*.safetensors")), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    assert ("I32" if fmt == "int4" else "F8_E4M3") in dtypes
    graph, params = run_pipeline(*trace_model(model))
    expected = run_batch(graph, dequantized_params(graph, params, fmt, group), PROMPTS)
    llm = kiln.LLM(out)
    greedy = kiln.SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, logprobs=1)
    for prompt, row in zip(PROMPTS, expected, strict=True):
        (result,) = llm.generate([prompt], greedy)
        assert result.outputs[0].token_ids == [int(row.argmax())]


def test_smollm2_in_int4_still_answers(tmp_path):
    out = kiln.compile("builtin:smollm2", tmp_path / "int4", quantization="int4", group_size=64)
    assert json.loads((out / "manifest.json").read_text())["quantization"]["linears"] == 120
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smollm2_tokenizer().apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True
    )
    (result,) = kiln.LLM(out).generate([prompt], kiln.SamplingParams(max_tokens=12, temperature=0))
    assert "Paris" in result.outputs[0].text
