"""Quantized models on a real GPU: int4 and fp8 artifacts (QuantLinear cubins) against
transformers running the same model with each projection's weight replaced by its
dequantized self (the float model the quantized one equals)."""

from __future__ import annotations

import pytest
import torch
from test_cuda_model import POSITIONS, PROMPTS, argmax_agreement, teacher_forced

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]
GROUP = {"int4": 128, "fp8": 0}


def dequantized_copy(model, fmt: str):
    """`model` with every projection but the LM head quantized and dequantized in place
    (projections Kiln merges quantize row by row, so merging changes nothing)."""
    from ir.quant import dequantize, quantize

    head = model.get_output_embeddings()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module is not head:
                w = module.weight
                qweight, scales, *zeros = quantize(w, fmt, GROUP[fmt])
                zero = zeros[0] if zeros else None
                w.copy_(dequantize(fmt, GROUP[fmt], qweight, scales, zero, w.dtype))
    return model


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
@pytest.mark.parametrize(
    "name, layers", [("qwen3-0.6b", 8), ("llama-3.1-8b", 2)], ids=["qwen3-8layers", "8b-2layers"]
)
def test_quantized_model_matches_transformers_on_its_dequantized_weights(
    name, layers, fmt, dtype, tmp_path
):
    from benchmarks.models import in_memory_artifact, random_model
    from benchmarks.tensor_parallel import generate, teacher_logits
    from ir.ops import QuantLinear
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    torch_dtype = getattr(torch, dtype)
    model = random_model(name, dtype=torch_dtype, logit_scale=10.0, num_hidden_layers=layers)
    artifact = in_memory_artifact(model, name, tmp_path, quantization=fmt, group_size=128)
    assert artifact.manifest["quantization"]["linears"] == 4 * layers  # qkv, o, gate/up, down
    engine = Engine(artifact, EngineConfig(num_kv_blocks=PROMPTS * POSITIONS // 16 + 16))
    quantized = [i for i, n in enumerate(artifact.graph.nodes) if isinstance(n.op, QuantLinear)]
    assert quantized and all(i in engine.runner.cubin_ops for i in quantized)  # kernels, not torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (PROMPTS, POSITIONS), generator=g)
    ours = teacher_forced(engine, ids).float()  # 1024 rows: dequantize + cuBLAS
    prompts = ids[:4, :9].tolist()
    tokens = generate(engine, prompts, 24)  # decodes of 4 and fewer rows: the GEMV, in graphs
    decode_logits = teacher_logits(engine, prompts, tokens).float()
    engine.close()
    model = dequantized_copy(model, fmt)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        theirs = model(ids.cuda()).logits.reshape(PROMPTS * POSITIONS, -1).float()
        exact = model.float()(ids.cuda()).logits.reshape(PROMPTS * POSITIONS, -1)
        seqs = [torch.tensor([p + t[:-1]], device="cuda") for p, t in zip(prompts, tokens)]
        decode_exact = torch.cat([model(s).logits[0, len(p) - 1 :] for s, p in zip(seqs, prompts)])
    scale = theirs.std().item()
    err = (ours - theirs).abs()
    agree, ours_exact, theirs_exact = argmax_agreement(ours, theirs, exact)
    decoded = (decode_logits.argmax(-1) == decode_exact.argmax(-1)).float().mean().item()
    print(
        f"{name} {fmt} {dtype}: logit std {scale:.3f}, mean |err| {err.mean():.4f}, max |err| "
        f"{err.max():.3f}; argmax: kiln vs hf {agree:.4f}, vs hf fp32: kiln {ours_exact:.4f}, "
        f"hf {theirs_exact:.4f}; greedy tokens the fp32 model's choice: {decoded:.4f}"
    )
    if dtype == "float32":
        assert err.mean().item() < 1e-3 * scale
        assert agree >= 0.99 and decoded >= 0.99
    else:  # bf16 storage: both round activations at different points
        assert err.mean().item() < 0.03 * scale
        assert ours_exact >= theirs_exact - 0.01
        assert decoded >= 0.95
