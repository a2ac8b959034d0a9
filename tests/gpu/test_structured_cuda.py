"""Structured outputs on the GPU: the grammar mask applied to CUDA logits picks what it
picks on the CPU, and every output matches its regex."""

from __future__ import annotations

import re

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

# a raw vocabulary: digits, letters, a few multi-character pieces, then the stop token
VOCAB = [*"0123456789", *"abcdefxyz-", "12", "345", "ab-", "-9", "</s>"]
PATTERN = r"[0-9]{3}-[a-f]{2,4}"


def run(device: str, temperature: float) -> list[str]:
    import xgrammar

    from runtime.sampler import SamplingState, make_generator, sample
    from runtime.sampling_params import SamplingParams

    info = xgrammar.TokenizerInfo(VOCAB, stop_token_ids=[len(VOCAB) - 1])
    grammar = xgrammar.GrammarCompiler(info).compile_regex(PATTERN)
    params = SamplingParams(temperature=temperature, top_p=0.9, max_tokens=16)
    states = [
        SamplingState(params, [0], [], (len(VOCAB) - 1,), make_generator(row, device),
                      xgrammar.GrammarMatcher(grammar))
        for row in range(8)
    ]  # fmt: skip
    g = torch.Generator().manual_seed(0)
    texts, live = [""] * len(states), list(range(len(states)))
    for _ in range(16):  # a finished row leaves the batch, as the engine's sequences do
        logits = torch.randn(len(live), len(VOCAB), generator=g).to(device)
        tokens = sample(logits, [states[row] for row in live])
        for row, token in zip(live, tokens):
            states[row].accept(token.token_id)  # as the engine does with each token
            states[row].output_token_ids.append(token.token_id)
            texts[row] += VOCAB[token.token_id] if token.token_id != len(VOCAB) - 1 else ""
        live = [r for r in live if states[r].output_token_ids[-1] != len(VOCAB) - 1]
        if not live:
            break
    assert not live, "every row ends with the stop token"
    return texts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_mask_on_cuda_logits_picks_as_on_the_cpu(temperature):
    on_gpu = run("cuda", temperature)
    print(f"structured outputs on cuda, temperature {temperature}: {on_gpu}")
    assert all(re.fullmatch(PATTERN, t) for t in on_gpu)
    if temperature == 0.0:  # greedy: the same logits, the same tokens
        assert on_gpu == run("cpu", temperature)
