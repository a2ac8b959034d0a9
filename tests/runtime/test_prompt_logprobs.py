"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers' log-softmax of the
same prompt, in float32: chunked over steps, batched with other requests, past a prefix-cache
hit, through preemption, and once per request with n samples. Both scheduling modes."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import record_preemptions, tiny_model

import kiln

pytestmark = pytest.mark.usefixtures("scheduling")

TOP = 3
ATOL = 1e-4  # float32 logprobs: kiln's kernels and transformers' sum in different orders


@pytest.fixture(scope="module")
def model():
    return tiny_model("qwen3")


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    model.save_pretrained(src, safe_serialization=True)
    return kiln.compile(str(src), tmp_path_factory.mktemp("art") / "qwen3")


def scored(max_tokens=2, n=1):
    return kiln.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, n=n, prompt_logprobs=TOP
    )


def prompts(count, seed, lengths=(2, 90)):
    rng = random.Random(seed)
    return [[rng.randrange(160) for _ in range(rng.randint(*lengths))] for _ in range(count)]


def assert_match(model, prompt, got):
    """got: kiln's prompt logprobs; each prompt token's logprob and rank, and the top ids and
    their logprobs, as transformers' float32 log-softmax gives them (a rank or a top-k
    member may differ only between logprobs within ATOL of each other)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert got is not None and len(got) == len(prompt)
    assert got[0] is None
    for position, entry in enumerate(got[1:]):
        token = prompt[position + 1]
        row = ref[position]
        assert entry[token].logprob == pytest.approx(row[token].item(), abs=ATOL)
        surely_above = int((row > row[token] + ATOL).sum())
        maybe_above = int((row >= row[token] - ATOL).sum())
        assert surely_above < entry[token].rank <= maybe_above
        kth = row.topk(TOP).values[-1].item()
        ranked = sorted((lp.rank, t) for t, lp in entry.items() if lp.rank <= TOP)
        assert [r for r, _ in ranked] == list(range(1, TOP + 1))
        for _, t in ranked:
            assert entry[t].logprob == pytest.approx(row[t].item(), abs=ATOL)
            assert row[t].item() >= kth - ATOL
        assert len(entry) in (TOP, TOP + 1)  # the prompt token joins the top k if outside it


def test_chunked_and_batched_prompts_score_as_transformers(model, artifact):
    ps = prompts(6, seed=0)
    plain = kiln.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    # prompts of up to 90 tokens in chunks of at most 32 a step, beside requests without
    params = [scored() if i % 2 == 0 else plain for i in range(len(ps))]
    llm = kiln.LLM(artifact, num_kv_blocks=256, max_num_batched_tokens=32)
    outs = llm.generate(ps, params, use_tqdm=False)
    for p, sp, out in zip(ps, params, outs, strict=True):
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            assert_match(model, p, out.prompt_logprobs)
    # scoring changes nothing sampled
    alone = kiln.LLM(artifact, num_kv_blocks=256)
    plain_params = [
        kiln.SamplingParams(max_tokens=sp.max_tokens, temperature=0.0, ignore_eos=True)
        for sp in params
    ]
    assert [o.token_ids for o in outs] == [
        o.token_ids for o in alone.generate(ps, plain_params, use_tqdm=False)
    ]


def test_prompts_longer_than_a_steps_scoring_cap_are_scored_over_steps(
    model, artifact, monkeypatch
):
    monkeypatch.setattr("runtime.scheduler.MAX_SCORED_TOKENS", 7)
    ps = prompts(3, seed=4, lengths=(20, 40))
    outs = kiln.LLM(artifact, num_kv_blocks=64).generate(ps, scored(), use_tqdm=False)
    for p, out in zip(ps, outs, strict=True):
        assert_match(model, p, out.prompt_logprobs)


def test_a_one_token_prompt_has_only_the_unscored_first(artifact):
    out = kiln.LLM(artifact, num_kv_blocks=16).generate([[7]], scored(), use_tqdm=False)[0]
    assert out.prompt_logprobs == [None]


def test_a_cached_prefix_is_computed_again_for_its_logprobs(model, artifact):
    (prompt,) = prompts(1, seed=1, lengths=(70, 70))
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    llm.generate([prompt], kiln.SamplingParams(max_tokens=1), use_tqdm=False)
    before = llm.engine.num_computed_tokens
    out = llm.generate([prompt], scored(max_tokens=1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert llm.engine.num_computed_tokens - before == len(prompt)
    assert_match(model, prompt, out.prompt_logprobs)
    # a request without prompt logprobs still hits the blocks the scored one cached
    again = llm.generate([prompt], kiln.SamplingParams(max_tokens=1), use_tqdm=False)[0]
    assert again.num_cached_tokens == 64


def test_preempted_prompts_are_scored_once(model, artifact):
    ps = prompts(12, seed=2, lengths=(40, 120))
    llm = kiln.LLM(artifact, num_kv_blocks=24, max_num_batched_tokens=64)
    preempted = record_preemptions(llm.engine)
    outs = llm.generate(ps, scored(max_tokens=12), use_tqdm=False)
    assert preempted, "the pool was meant to be too small"
    for p, out in zip(ps, outs, strict=True):
        assert_match(model, p, out.prompt_logprobs)


def test_n_samples_share_one_list_of_prompt_logprobs(model, artifact):
    (prompt,) = prompts(1, seed=3, lengths=(50, 50))
    llm = kiln.LLM(artifact, num_kv_blocks=64, max_num_batched_tokens=40)
    params = kiln.SamplingParams(max_tokens=3, temperature=1.0, seed=5, n=3, prompt_logprobs=TOP)
    updates = []
    llm.engine.add_request("r", prompt, params)
    while llm.engine.has_unfinished():
        updates += llm.engine.step()
    carrying = [u for u in updates if u.prompt_logprobs is not None]
    assert len(carrying) == 1 and carrying[0] is updates[0]
    assert_match(model, prompt, carrying[0].prompt_logprobs)


def test_a_prompt_scored_in_full_may_come_from_the_cache(model, artifact):
    # the budget fits one sample's prompt a step: once the first has scored it, the other
    # two take its blocks from the prefix cache, and only their last tokens are computed
    (prompt,) = prompts(1, seed=4, lengths=(50, 50))
    llm = kiln.LLM(artifact, num_kv_blocks=64, max_num_batched_tokens=50, max_num_seqs=1)
    params = kiln.SamplingParams(max_tokens=3, temperature=0.0, n=3, prompt_logprobs=TOP)
    out = llm.generate([prompt], params, use_tqdm=False)[0]
    assert_match(model, prompt, out.prompt_logprobs)
    assert llm.engine.num_computed_tokens == 50 + 2 * (50 - 48) + 3 * 2
    assert len({tuple(c.token_ids) for c in out.outputs}) == 1  # greedy: the same


@pytest.mark.parametrize("value", [-1, 21])
def test_prompt_logprobs_out_of_range_are_refused(value):
    with pytest.raises(ValueError, match=r"invalid prompt_logprobs: .* \(must be in \[0, 20\]\)"):
        kiln.SamplingParams(prompt_logprobs=value)
