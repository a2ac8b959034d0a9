"""Sampler tests against straightforward per-row torch references."""

from __future__ import annotations

import random

import pytest
import torch

from runtime.bad_words import resolve_bad_words
from runtime.sampler import (
    SamplingState,
    apply_filters,
    apply_penalties,
    argmax_rows,
    make_generator,
    sample,
)
from runtime.sampling_params import SamplingParams


@pytest.fixture(autouse=True)
def _seed_inputs():
    """Random inputs, reproducible from run to run."""
    random.seed(0)
    torch.manual_seed(0)


def state(params: SamplingParams, prompt=(), output=(), eos=(), seed=None) -> SamplingState:
    generator = None if seed is None else make_generator(seed, "cpu")
    return SamplingState(params, list(prompt), list(output), tuple(eos), generator)


def reference_penalties(row: torch.Tensor, s: SamplingState) -> torch.Tensor:
    x = row.float().clone()
    p = s.params
    for token, bias in p.logit_bias.items():
        x[token] += bias
    if p.allowed_token_ids is not None:
        x[[t for t in range(len(x)) if t not in p.allowed_token_ids]] = -torch.inf
    for token in set(s.prompt_token_ids + s.output_token_ids):
        x[token] = (
            x[token] / p.repetition_penalty if x[token] > 0 else x[token] * p.repetition_penalty
        )
    for token in set(s.output_token_ids):
        x[token] -= p.frequency_penalty * s.output_token_ids.count(token) + p.presence_penalty
    if len(s.output_token_ids) < p.min_tokens:
        for token in (() if p.ignore_eos else s.eos_token_ids) + p.stop_token_ids:
            x[token] = -torch.inf
    return x


def reference_filter(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = row.double() / p.temperature
    if p.min_p > 0.0:
        probs = torch.softmax(x, -1)
        x[probs < p.min_p * probs.max()] = -torch.inf
    if p.top_k > 0:
        kth = sorted(x.tolist(), reverse=True)[min(p.top_k, len(x)) - 1]
        x[x < kth] = -torch.inf
    if p.top_p < 1.0:
        probs = torch.softmax(x, -1).tolist()
        mass = 0.0
        for token in sorted(range(len(x)), key=lambda t: -probs[t]):
            if mass >= p.top_p:
                x[token] = -torch.inf
            mass += probs[token]
    return x.float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax(dtype):
    logits = (torch.randn(9, 1003) * 3).to(dtype)
    states = [state(SamplingParams(temperature=0.0), seed=i if i % 2 else None) for i in range(9)]
    tokens = [t.token_id for t in sample(logits, states)]
    assert tokens == logits.float().argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [1003, 64 * 7, 151936, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_pass_argmax_is_argmax_with_ties_to_the_first(vocab, dtype):
    # bf16 rounding of small integers makes many ties, in a chunk and across chunks; the
    # planted maxima tie too, and the first of them must win as with argmax
    x = torch.randint(-50, 50, (5, vocab)).to(dtype)
    x[1, [vocab - 1, vocab // 2, 3]] = 100.0  # ties across chunks: index 3 wins
    x[2, [70, 65]] = 100.0  # ties inside one chunk: 65
    x[3] = 7.0  # all equal: 0
    x[4, -1] = float("nan")  # nan beats everything, as in argmax
    want = x.argmax(-1)
    assert want[1:4].tolist() == [3, 65, 0]
    assert torch.equal(argmax_rows(x), want)
    assert torch.equal(argmax_rows(x[:1]), want[:1])  # one row: the case the split is for


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 1e-46])
def test_temperature_too_small_to_divide_by_is_greedy(temperature):
    # logits / 1e-40 overflow float32 to +-inf: the probabilities were nan and token 0 came out
    logits = torch.tensor([[-1.0, 3.0, 2.0, 1.0, 0.5]])
    params = SamplingParams(temperature=temperature)
    for seed in range(20):
        assert sample(logits, [state(params, seed=seed)])[0].token_id == 1


@pytest.mark.parametrize("top_p", [1e-46, 1e-300])
def test_top_p_below_float32_range_keeps_the_top_token(top_p):
    logits = torch.tensor([[-1.0, 3.0, 2.0, 1.0, 0.5]])
    kept = apply_filters(logits, [state(SamplingParams(top_p=top_p))]).isfinite()
    assert kept.tolist() == [[False, True, False, False, False]]


def test_min_p_comes_before_top_p():
    # probabilities 0.5, 0.2, 0.1 and 40 tokens of 0.005: min_p 0.1 (below 0.05) leaves
    # the first three; top_p 0.75 of what is left keeps two. The other way round, top_p
    # counted the tail too and kept three.
    probs = torch.tensor([0.5, 0.2, 0.1] + [0.005] * 40)
    params = SamplingParams(top_p=0.75, min_p=0.1)
    kept = apply_filters(probs.log().unsqueeze(0), [state(params)]).isfinite()
    assert kept[0].nonzero().flatten().tolist() == [0, 1]


def test_non_finite_logit_bias_is_refused():
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: float("inf")})


def test_top_k_one_is_greedy():
    logits = torch.randn(7, 517) * 2
    params = SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.3)
    states = [state(params, prompt=random.sample(range(517), 20), seed=i) for i in range(7)]
    processed = apply_penalties(logits, states)
    for _ in range(5):
        assert [t.token_id for t in sample(logits, states)] == processed.argmax(-1).tolist()


def test_penalties_and_bias_match_reference():
    rng = random.Random(0)
    vocab = 97
    logits = torch.randn(6, vocab) * 4
    states = []
    for i in range(6):
        params = SamplingParams(
            repetition_penalty=rng.choice([1.0, 0.7, 1.5]),
            frequency_penalty=rng.uniform(-2, 2) if i % 3 else 0.0,
            presence_penalty=rng.uniform(-2, 2) if i % 2 else 0.0,
            logit_bias={rng.randrange(vocab): rng.uniform(-5, 5) for _ in range(i)},
            allowed_token_ids=rng.sample(range(vocab), 2 + 7 * i) if i % 2 else None,
            stop_token_ids=(5,) if i == 4 else (),
            min_tokens=i,
            max_tokens=32,
            ignore_eos=i == 5,
        )
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 30))]
        output = [rng.randrange(20) for _ in range(rng.randrange(0, 9))]  # small range: repeats
        states.append(state(params, prompt, output, eos=(3, 96)))
    before = logits.clone()
    got = apply_penalties(logits, states)
    torch.testing.assert_close(logits, before)  # the raw logits stay untouched
    want = torch.stack([reference_penalties(logits[i], s) for i, s in enumerate(states)])
    torch.testing.assert_close(got, want)  # float32 default tolerances: same ops, same order
    assert got.dtype == torch.float32


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.5, top_k=20, top_p=0.9, min_p=0.02),
        SamplingParams(temperature=1.0),
    ],
)
def test_filters_match_reference(params):
    logits = torch.randn(5, 301) * 3
    states = [state(params) for _ in range(5)]
    got = apply_filters(logits, states)
    want = torch.stack([reference_filter(row, params) for row in logits])
    # float32 vs float64 division: a few ulp on the kept logits; the masks must be identical
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=3),
        SamplingParams(temperature=0.8, top_p=0.7),
        SamplingParams(temperature=1.2, min_p=0.15),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05),
    ],
)
def test_sampling_stays_inside_filters_and_follows_probs(params):
    torch.manual_seed(1)
    logits = torch.randn(11) * 1.5
    expected = torch.softmax(reference_filter(logits, params).double(), -1)
    draws = 20_000
    got = [t.token_id for t in sample(logits.expand(draws, -1), [state(params)] * draws)]
    freq = torch.bincount(torch.tensor(got), minlength=11).double() / draws
    assert set(got) <= set(torch.nonzero(expected).flatten().tolist())
    # the std of each frequency is at most sqrt(0.25 / 20000) = 0.0035: 0.02 is over 5 sigma
    torch.testing.assert_close(freq, expected, rtol=0, atol=0.02)
    seeded = [state(params, seed=i) for i in range(500)]
    got = {t.token_id for t in sample(logits.expand(500, -1), seeded)}
    assert got <= set(torch.nonzero(expected).flatten().tolist())


def run_steps(target_position: int, batch: int, steps: int, seed: int) -> list[int]:
    """Sample `steps` tokens for one seeded request placed among `batch - 1` other rows."""
    vocab = 211
    target_logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(7))
    params = SamplingParams(temperature=0.9, top_p=0.95, repetition_penalty=1.2, max_tokens=64)
    target = state(params, prompt=[1, 2, 3], seed=seed)
    others = [
        state(SamplingParams(temperature=t, top_k=k), prompt=[4], seed=s)
        for t, k, s in [(1.0, -1, None), (0.0, -1, 5), (1.5, 10, 99), (0.3, -1, None)]
    ]
    states = others[: batch - 1]
    states.insert(target_position, target)
    for step in range(steps):
        logits = torch.randn(batch, vocab) * 2
        logits[target_position] = target_logits[step]
        for s, token in zip(states, sample(logits, states), strict=True):
            s.output_token_ids.append(token.token_id)
    return target.output_token_ids


def test_same_seed_same_tokens_whatever_the_batch():
    alone = run_steps(target_position=0, batch=1, steps=12, seed=1234)
    assert run_steps(target_position=2, batch=5, steps=12, seed=1234) == alone
    assert run_steps(target_position=1, batch=3, steps=12, seed=1234) == alone


def test_different_seeds_differ():
    flat = torch.zeros(1, 1000)
    runs = []
    for seed in (1, 2, 3):
        s = state(SamplingParams(), seed=seed)
        runs.append([sample(flat, [s])[0].token_id for _ in range(8)])
    assert len({tuple(r) for r in runs}) == 3  # equal by chance with probability ~1e-24


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_and_stop_ids(temperature):
    logits = torch.zeros(1, 50)
    logits[0, 7] = 30.0  # EOS: almost certain when allowed
    logits[0, 9] = 29.0  # a stop token id
    params = SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=(9,))
    s = state(params, output=[1, 1], eos=(7,))
    for _ in range(50):
        assert sample(logits, [s])[0].token_id not in (7, 9)
    s.output_token_ids.append(1)  # min_tokens reached: both are allowed again
    after = {sample(logits, [s])[0].token_id for _ in range(50)}
    # sampled, 9 has probability 0.27 per draw: missing it 50 times has probability 2e-7
    assert after == ({7} if temperature == 0.0 else {7, 9})
    ignore = state(SamplingParams(temperature=0.0, min_tokens=3, ignore_eos=True), eos=(7,))
    assert sample(logits, [ignore])[0].token_id == 7  # with ignore_eos, EOS is an ordinary token


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_only_allowed_tokens_are_sampled(temperature):
    logits = torch.randn(3, 64) * 5
    allowed = (4, 17, 60)
    params = SamplingParams(temperature=temperature, allowed_token_ids=allowed)
    states = [state(params, seed=i) for i in range(2)] + [state(SamplingParams(temperature=0))]
    seen = set()
    for _ in range(40):
        picked = [t.token_id for t in sample(logits, states)]
        assert picked[2] == int(logits[2].argmax())  # the row without a list is untouched
        seen.update(picked[:2])
    assert seen <= set(allowed)
    if temperature == 0.0:
        assert seen == {max(allowed, key=lambda t: logits[0, t])} | {
            max(allowed, key=lambda t: logits[1, t])
        }


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bad_words_ban_their_last_token_once_the_output_ends_with_the_rest(temperature):
    vocab = 64
    logits = torch.full((3, vocab), -20.0)
    logits[:, [5, 9, 12, 20]] = torch.tensor([80.0, 60.0, 40.0, 20.0])  # 5, then 9, 12, 20
    # 5: always banned; 9: after (30, 31) or (44, 45); 12: after 40 or (44, 45)
    words = ((5,), (30, 31, 9), (40, 12), (44, 45, 12), (44, 45, 9))
    params = SamplingParams(temperature=temperature, bad_words_token_ids=words)
    cases = [  # the output so far, the tokens banned next, the token picked
        ([], {5}, 9),  # the prompt ends with (30, 31): a word is matched in the output only
        ([1, 30, 31], {5, 9}, 12),
        ([30, 31, 40], {5, 12}, 9),  # ends with 40, no longer with (30, 31)
        ([45], {5}, 9),  # a prefix's last token alone is not the prefix (44, 45)
        ([7, 44, 45], {5, 9, 12}, 20),  # two words after the same prefix
        ([44, 45, 1], {5}, 9),
    ]
    for output, bans, want in cases:
        states = [
            state(params, prompt=[30, 31], output=output, seed=1),
            state(SamplingParams(temperature=temperature), output=[30, 31, 40]),
            state(SamplingParams(temperature=temperature, bad_words_token_ids=((63,),))),
        ]
        processed = apply_penalties(logits, states)
        assert set(torch.nonzero(processed[0] == -torch.inf).flatten().tolist()) == bans, output
        torch.testing.assert_close(processed[1], logits[1])  # a row without bad words: as is
        assert torch.nonzero(processed[2] != logits[2]).flatten().tolist() == [63]
        for _ in range(10):  # sampled: 20 logits apart, the next best token is all but certain
            assert [t.token_id for t in sample(logits, states)] == [want, 5, 5], output


def test_bad_words_params_are_validated():
    assert SamplingParams(bad_words=["a", " b"]).bad_words == ("a", " b")
    ids = SamplingParams(bad_words_token_ids=[[1], [2, 3]]).bad_words_token_ids
    assert ids == ((1,), (2, 3))
    for words in ("a", ["a", ""], [" "], ["a", 3]):
        with pytest.raises(ValueError, match="invalid bad_words: "):
            SamplingParams(bad_words=words)
    for ids in ([[]], [[1, -1]], [[1.0]], [[True]], [1, 2], ((1,), "2")):
        with pytest.raises(ValueError, match="invalid bad_words_token_ids: "):
            SamplingParams(bad_words_token_ids=ids)


def test_bad_words_tokenize_as_vllm_does():
    from conftest import smollm2_tokenizer

    tok = smollm2_tokenizer()

    def ids(text):
        return tuple(tok.encode(text, add_special_tokens=False))

    params = resolve_bad_words(SamplingParams(bad_words=["hello", "  world"]), tok)
    # each word alone (leading spaces stripped) and after a space: another first token
    assert params.bad_words_token_ids == (ids("hello"), ids(" hello"), ids("world"), ids(" world"))
    assert len(ids(" hello")) == 1 and ids(" hello") != ids("hello")
    # after a space the word takes another number of tokens: vLLM keeps only the word alone
    assert len(ids(" Kilns fire")) != len(ids("Kilns fire"))
    kilns = resolve_bad_words(SamplingParams(bad_words=["Kilns fire"]), tok)
    assert kilns.bad_words_token_ids == (ids("Kilns fire"),)
    assert resolve_bad_words(params, tok) == params  # resolved again: each sequence once
    with pytest.raises(ValueError, match="tokenizer"):
        resolve_bad_words(SamplingParams(bad_words=["a"]), None)


def test_logprobs_are_raw_log_softmax_with_ranks():
    logits = (torch.randn(5, 333) * 3).to(torch.bfloat16)
    asked = [None, 0, 3, 20, 7]
    states = [
        state(SamplingParams(temperature=1.0, logprobs=n, repetition_penalty=1.5), prompt=[0, 1])
        for n in asked
    ]
    reference = torch.log_softmax(logits.float(), -1)
    for row, (n, token) in enumerate(zip(asked, sample(logits, states), strict=True)):
        if n is None:
            assert token.logprobs is None
            continue
        # bf16 logits tie often and topk orders ties arbitrarily: compare values, not ids
        assert next(iter(token.logprobs)) == token.token_id
        assert len(token.logprobs) in (n, n + 1)
        values = sorted((lp.logprob for lp in token.logprobs.values()), reverse=True)
        assert values[:n] == pytest.approx(reference[row].topk(n).values.tolist(), abs=1e-5)
        top = sorted((lp.rank, lp.logprob) for lp in token.logprobs.values() if lp.rank <= n)
        assert [r for r, _ in top] == list(range(1, n + 1))  # exactly n, even among ties
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        for token_id, lp in token.logprobs.items():
            want = reference[row, token_id]
            assert lp.logprob == pytest.approx(want.item(), abs=1e-5)
            if lp.rank > n:  # the sampled token, outside the top n: after all as likely
                assert token_id == token.token_id
                assert lp.rank == int((reference[row] >= want).sum())
            assert lp.decoded_token is None


def test_a_sampled_token_tied_with_the_top_one_keeps_one_alternative():
    logits = torch.full((2, 50), -5.0)
    logits[:, [3, 7]] = 4.0  # a tie for the most likely token
    states = [state(SamplingParams(temperature=0.0, logprobs=1)) for _ in range(2)]
    for token in sample(logits, states):
        ranks = {t: lp.rank for t, lp in token.logprobs.items()}
        assert sorted(ranks.values())[0] == 1 and sum(r <= 1 for r in ranks.values()) == 1
        assert ranks[token.token_id] in (1, 2)  # 2: the other one came first in the top 1


def test_invalid_sampling_params_say_the_rule():
    rule = r"invalid min_tokens: 10 \(must be in \[0, max_tokens = 4\]\)"
    with pytest.raises(ValueError, match=rule):
        SamplingParams(max_tokens=4, min_tokens=10)
    with pytest.raises(ValueError, match=r"invalid top_p: 0\.0 \(must be in \(0, 1\]\)"):
        SamplingParams(top_p=0.0)
