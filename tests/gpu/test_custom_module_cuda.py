"""A custom architecture (a plain torch module) compiled for the GPU: kernels and graphs."""

from __future__ import annotations

import pytest
import torch
from custom_decoder import VOCAB, decoder, eager_greedy

import kiln

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_custom_module_on_the_gpu_decodes_as_the_module(dtype, tmp_path):
    model = decoder(layers=4).to(dtype)
    art = kiln.compile(model, tmp_path / "art", max_model_len=256, target="cuda")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (1, 9, 40, 77)]
    params = kiln.SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    with kiln.LLM(art, num_kv_blocks=64, max_num_batched_tokens=32) as llm:
        assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
        outs = llm.generate(prompts, params, use_tqdm=False)
    model = model.cuda()
    with torch.no_grad():
        want = [eager_greedy(model, p, 16) for p in prompts]
    same = [o.token_ids == w for o, w in zip(outs, want, strict=True)]
    print(f"custom module {dtype}: greedy equal to the module for {sum(same)}/{len(same)}")
    if dtype == torch.float32:
        assert all(same)
    else:  # bf16 rounds differently in fused kernels: the first tokens must still agree
        assert all(o.token_ids[:4] == w[:4] for o, w in zip(outs, want, strict=True))
