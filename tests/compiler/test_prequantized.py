"""Pre-quantized GPTQ and AWQ checkpoints: tiny models quantized and packed here in each
format's on-disk layout (written from the formats' descriptions, independently of the
compiler's converter), compiled, and checked against the float model over the test's own
dequantization of the checkpoint; and the checkpoints kiln refuses."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import run_batch, tiny_model
from safetensors.torch import load_file, save_file
from test_tensor_parallel import lockstep

import kiln
from compiler.artifact import load_artifact
from compiler.frontend import UnsupportedModelError, trace_model
from compiler.passes.prequantized import use_packed
from compiler.passes.quantize import lm_head
from compiler.pipeline import run_pipeline
from ir import ops
from runtime.batch import build_batch
from runtime.executor import allocate_kv_cache, kv_cache_spec

PROMPTS = [[3, 17, 29, 4, 150, 8, 61], [90], [12, 44, 7, 7, 101, 33, 2, 5, 19, 140, 66]]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column AWQ_ORDER[i]
NIBBLES = torch.arange(0, 32, 4, dtype=torch.int64)


def words(codes: torch.Tensor) -> torch.Tensor:
    """[..., 8] codes -> int32 words, code j in bits 4j (wrapped to signed as stored)."""
    w = (codes.long() << NIBBLES).sum(-1)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def nibbles(word: torch.Tensor, j: int) -> torch.Tensor:
    return (word >> (4 * j)) & 15


def rtn(w: torch.Tensor, group: int, sym: bool):
    """Round-to-nearest per group of inputs: codes [N, K], scales (fp16) and zeros [N, G]."""
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    if sym:  # GPTQ's symmetric grid: zero 8
        scales = (g.abs().amax(-1) * 2 / 15).half()
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scales = ((hi - lo) / 15).half()
        zeros = (-lo / scales.float()).round().clamp(1, 15).long()  # v1 cannot store zero 0
    codes = (g / scales.float()[..., None] + zeros[..., None]).round().clamp(0, 15).long()
    return codes.reshape(n, k), scales, zeros


def pack_gptq(codes, scales, zeros, group):
    """GPTQ v1: qweight [K/8, N] along K, qzeros [G, N/8] along N holding zero - 1."""
    n, k = codes.shape
    return {
        "qweight": words(codes.T.reshape(k // 8, 8, n).transpose(1, 2)),
        "qzeros": words(((zeros.T - 1) & 15).reshape(-1, n // 8, 8)),
        "scales": scales.T.contiguous(),
        "g_idx": (torch.arange(k) // group).to(torch.int32),
    }


def pack_awq(codes, scales, zeros, group):
    """AWQ gemm: qweight [K, N/8] and qzeros [G, N/8] along N, columns in AWQ_ORDER."""
    n, k = codes.shape
    return {
        "qweight": words(codes.T.reshape(k, n // 8, 8)[..., AWQ_ORDER]),
        "qzeros": words(zeros.T.reshape(-1, n // 8, 8)[..., AWQ_ORDER]),
        "scales": scales.T.contiguous(),
    }


def dequantize(method: str, t: dict, group: int) -> torch.Tensor:
    """The [N, K] float32 weight a checkpoint's tensors stand for, read nibble by nibble."""
    k = t["qweight"].shape[0] * (8 if method == "gptq" else 1)
    n = t["scales"].shape[1]
    codes, zeros = torch.empty(k, n), torch.empty(t["qzeros"].shape[0], n)
    for j in range(8):
        if method == "gptq":  # input 8i + j of word row i; output 8c + j of zero word c
            codes[j::8] = nibbles(t["qweight"], j).float()
            zeros[:, j::8] = nibbles(t["qzeros"], j).float() + 1
        else:  # output 8c + AWQ_ORDER[j] of word c
            codes[:, AWQ_ORDER[j] :: 8] = nibbles(t["qweight"], j).float()
            zeros[:, AWQ_ORDER[j] :: 8] = nibbles(t["qzeros"], j).float()
    group = k if group == -1 else group
    scales = t["scales"].float().repeat_interleave(group, 0)
    return ((codes - zeros.repeat_interleave(group, 0)) * scales).T.contiguous()


def write_checkpoint(path, model, method: str, group: int, sym: bool = True, **qconfig):
    """Quantize `model`'s projections into a `method` checkpoint at `path`, and set them to
    their dequantized selves in `model` (the float model the artifact must match)."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in PROJECTIONS:
            w = state.pop(f"{name}.weight")
            size = w.shape[1] if group == -1 else group
            codes, scales, zeros = rtn(w, size, sym)
            tensors = (pack_gptq if method == "gptq" else pack_awq)(codes, scales, zeros, size)
            state.update({f"{name}.{k}": v for k, v in tensors.items()})
            back = dequantize(method, tensors, group)
            assert (back - w).abs().max() <= scales.float().max()  # packed as meant: a step
            with torch.no_grad():
                module.weight.copy_(back)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    config = model.config.to_dict()
    fields = {"gptq": {"sym": sym, "desc_act": False, "checkpoint_format": "gptq"}}
    fields["awq"] = {"zero_point": True, "version": "gemm"}
    base = {"quant_method": method, "bits": 4, "group_size": group}
    config["quantization_config"] = base | fields[method] | qconfig
    (path / "config.json").write_text(json.dumps(config))
    return path


CASES = {  # method, family, group size, symmetric
    "gptq-llama-sym": ("gptq", "llama", 16, True),
    "gptq-qwen2-asym-rows": ("gptq", "qwen2", -1, False),
    "awq-qwen2": ("awq", "qwen2", 16, False),
}


@pytest.mark.parametrize("case", CASES)
def test_checkpoint_compiles_to_its_own_codes(tmp_path, case):
    method, family, group, sym = CASES[case]
    model = tiny_model(family, intermediate_size=96)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    src = write_checkpoint(tmp_path, model, method, group, sym)
    out = kiln.compile(str(src), tmp_path / "art")
    manifest = json.loads((out / "manifest.json").read_text())
    entry = {"format": "int4", "group_size": group, "linears": 8, "method": method}
    assert manifest["quantization"] == entry
    art = load_artifact(out)
    counts = art.graph.op_counts()
    assert counts["QuantLinear"] == 2 * 4 and counts["Linear"] == 1  # qkv, o, gate/up, down
    head = lm_head(art.graph)
    assert torch.equal(art.params[head.inputs[1]], original["lm_head.weight"])
    if family == "qwen2":  # the q/k/v biases merged with their projections
        merged = next(n for n in art.graph.nodes if isinstance(n.op, ops.QuantLinear))
        assert len(merged.inputs) == 5 and art.params[merged.inputs[4]].shape == (48 + 2 * 24,)
    expected = run_batch(*run_pipeline(*trace_model(model)), PROMPTS)
    logits = run_batch(art.graph, art.params, PROMPTS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and transformers' own forward of that float model
        for prompt, row in zip(PROMPTS, expected, strict=True):
            hf = model(torch.tensor([prompt])).logits[0, -1]
            torch.testing.assert_close(row, hf, atol=1e-4, rtol=1e-4)


def test_tensor_parallel_ranks_take_whole_groups(tmp_path):
    model = tiny_model("llama", intermediate_size=96)
    src = write_checkpoint(tmp_path, model, "gptq", 8)
    tp1 = load_artifact(kiln.compile(str(src), tmp_path / "tp1"))
    tp2 = kiln.compile(str(src), tmp_path / "tp2", tensor_parallel_size=2)
    ranks = [load_artifact(tp2, rank=r) for r in range(2)]
    counts = ranks[0].graph.op_counts()
    assert counts["QuantLinear"] == 2 * 4 and counts["AllReduce"] == 2 * 2  # o, down: rows
    rng = random.Random(5)
    seqs = [[rng.randrange(160) for _ in range(n)] for n in (9, 4)]
    batch = build_batch([(seqs[0], 0, [1]), (seqs[1], 0, [3])], 16)
    caches = [allocate_kv_cache(kv_cache_spec(r.graph), 4, 16) for r in ranks]
    expected = run_batch(tp1.graph, tp1.params, seqs, block_size=16)
    for logits in lockstep(ranks[0].graph, [r.params for r in ranks], batch, caches):
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    src = write_checkpoint(tmp_path, model, "gptq", 16)
    with pytest.raises(ValueError, match="do not split into 2"):  # 48 inputs: 3 groups of 16
        kiln.compile(str(src), tmp_path / "no", tensor_parallel_size=2)


@pytest.mark.parametrize(
    "qconfig, error",
    [
        ({"bits": 8}, "8-bit"),
        ({"quant_method": "bitsandbytes"}, "'bitsandbytes'"),
        ({"checkpoint_format": "gptq_v2"}, "'gptq_v2'"),
        ({"is_marlin_format": True}, "'marlin'"),
        ({"quant_method": "awq", "version": "gemv"}, "'gemv'"),
        ({"quant_method": "awq", "version": "gemm", "zero_point": False}, "zero_point"),
    ],
)
def test_other_quantizations_are_refused(tmp_path, qconfig, error):
    config = tiny_model("llama").config.to_dict()
    base = {"quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False}
    config["quantization_config"] = base | qconfig
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=error):
        kiln.compile(str(tmp_path), tmp_path / "art")


def test_act_order_permutation_and_requantizing_are_refused(tmp_path):
    model = tiny_model("llama", intermediate_size=96)
    src = write_checkpoint(tmp_path, model, "gptq", 16, desc_act=True)
    with pytest.raises(ValueError, match="already quantized"):
        kiln.compile(str(src), tmp_path / "again", quantization="int4")
    tensors = load_file(src / "model.safetensors")
    g_idx = "model.layers.1.mlp.down_proj.g_idx"
    tensors[g_idx] = tensors[g_idx][torch.randperm(96, generator=torch.Generator().manual_seed(0))]
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="down_proj: act-order"):
        kiln.compile(str(src), tmp_path / "art")


def test_packed_weights_must_all_replace_linears():
    graph, params = trace_model(tiny_model("llama"))
    groups = torch.ones(160, 1)
    packed = {"model.embed_tokens.weight": (torch.zeros(160, 6, dtype=torch.int32), groups, groups)}
    with pytest.raises(ValueError, match="embed_tokens"):  # the embedding's, no Linear's
        use_packed(graph, params, packed)
