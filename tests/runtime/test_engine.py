"""Engine acceptance: continuous batching, preemption, aborts and prefix caching change no
output; seeded sampling is reproducible whatever else is in the batch. Every test runs with
synchronous and with asynchronous scheduling (each step launched before the last one's
tokens are read back); the requests run alone, the reference, always run synchronously."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import random
import signal
import string
import subprocess
import threading
import time
from dataclasses import replace

import pytest
import torch
from conftest import record_preemptions, tiny_model

import kiln
from compiler.artifact import ArtifactError, load_artifact
from runtime.async_engine import AsyncEngine, EngineDeadError, ThreadCore
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.engine_process import ProcessCore
from runtime.outputs import merge_update

pytestmark = pytest.mark.usefixtures("scheduling")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    tiny_model("qwen3").save_pretrained(src, safe_serialization=True)
    return kiln.compile(str(src), tmp_path_factory.mktemp("art") / "qwen3")


def greedy(max_tokens):
    return kiln.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def workload(n, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(160) for _ in range(rng.randint(1, 300))] for _ in range(n)]
    return prompts, [greedy(rng.randint(1, 24)) for _ in range(n)]


def alone_outputs(artifact, prompts, params):
    llm = kiln.LLM(artifact, num_kv_blocks=64, async_scheduling=False)
    return [llm.generate([p], [sp], use_tqdm=False)[0].outputs[0] for p, sp in zip(prompts, params)]


def alone(artifact, prompts, params):
    return [out.token_ids for out in alone_outputs(artifact, prompts, params)]


def assert_idle(llm):
    bm = llm.engine.scheduler.block_manager
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_total_blocks
    assert bm.usage == 0.0


def test_64_requests_chunked_together_equal_each_alone(artifact):
    prompts, params = workload(64)
    llm = kiln.LLM(artifact, num_kv_blocks=2048, max_num_batched_tokens=64)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in outs] == alone(artifact, prompts, params)
    assert all(len(o.token_ids) == p.max_tokens for o, p in zip(outs, params))
    assert_idle(llm)


def test_preemption_and_aborts_leave_outputs_and_pool_intact(artifact):
    prompts, params = workload(24, seed=1)
    expected = alone(artifact, prompts, params)
    # 40 blocks x 16 = 640 tokens for 24 requests of up to 324 tokens: preemption is certain
    llm = kiln.LLM(artifact, num_kv_blocks=40, max_num_batched_tokens=128)
    for i, (p, sp) in enumerate(zip(prompts, params)):
        llm.engine.add_request(str(i), p, sp)
    outs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    aborted, steps = set(), 0
    while llm.engine.has_unfinished():
        for update in llm.engine.step():
            outs[update.request_id] += update.token_ids
        steps += 1
        if steps == 6:  # abort every other request midway
            for i in range(0, len(prompts), 2):
                if llm.engine.abort(str(i)) is not None:
                    aborted.add(str(i))
    assert aborted
    for i, exp in enumerate(expected):
        if str(i) not in aborted:
            assert outs[str(i)] == exp
    assert_idle(llm)


def test_preemption_happens_and_changes_nothing(artifact):
    prompts, params = workload(16, seed=2)
    llm = kiln.LLM(artifact, num_kv_blocks=30, max_num_batched_tokens=96)
    preemptions = record_preemptions(llm.engine)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert preemptions, "the pool was meant to be too small"
    assert [o.token_ids for o in outs] == alone(artifact, prompts, params)
    assert_idle(llm)


def test_prefix_cache_computes_only_the_suffix(artifact):
    rng = random.Random(3)
    prefix = [rng.randrange(160) for _ in range(64)]
    first, second = prefix + [5, 6, 7], prefix + [9, 10, 11, 12, 13]
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    llm.generate([first], greedy(4), use_tqdm=False)
    before = llm.engine.num_computed_tokens
    out = llm.generate([second], greedy(4), use_tqdm=False)[0]
    # 4 blocks of 16 cached; the 5 suffix tokens + 3 decode steps are computed
    assert out.num_cached_tokens == 64
    assert llm.engine.num_computed_tokens - before == 5 + 3
    cold = kiln.LLM(artifact, num_kv_blocks=64, enable_prefix_caching=False)
    assert out.token_ids == cold.generate([second], greedy(4), use_tqdm=False)[0].token_ids


def test_seeded_sampling_is_reproducible_across_batches(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=256)
    prompt = list(range(10, 30))
    seeded = kiln.SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    solo = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    others = [list(range(i, i + 7)) for i in range(5)]
    noisy = kiln.SamplingParams(max_tokens=20, temperature=1.0)
    mixed = llm.generate(others[:2] + [prompt] + others[2:], [noisy] * 2 + [seeded] + [noisy] * 3)
    assert mixed[2].token_ids == solo
    other_seed = kiln.SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99)
    assert llm.generate([prompt], other_seed, use_tqdm=False)[0].token_ids != solo


def test_top_k_1_equals_greedy_and_n_samples_share_the_prompt(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=256)
    prompt = list(range(40, 90))
    g = llm.generate([prompt], greedy(12), use_tqdm=False)[0]
    k1 = kiln.SamplingParams(max_tokens=12, temperature=1.0, top_k=1, ignore_eos=True)
    assert llm.generate([prompt], k1, use_tqdm=False)[0].token_ids == g.token_ids
    both = kiln.SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=5, ignore_eos=True)
    out = llm.generate([prompt], both, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1  # per-sample seeds differ
    assert llm.engine.scheduler.block_manager.prefix_hits >= 48  # samples 2, 3 reuse 3 blocks


def test_logit_bias_and_penalties_change_outputs(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=256)
    prompt = list(range(3, 20))

    def run(**kw):
        sp = kiln.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, **kw)
        return llm.generate([prompt], sp, use_tqdm=False)[0].token_ids

    base = run()
    assert run(logit_bias={7: 100}) == [7] * 8
    assert run(logit_bias={7: 5}) == [7] * 8  # a bias just large enough to win every step
    # each earlier 7 costs 2: after a few, other tokens win again
    penalized = run(logit_bias={7: 5}, frequency_penalty=2.0)
    assert penalized[0] == 7 and 1 <= penalized.count(7) <= 3
    # prompt tokens (3..19) are penalized too: the greedy path leaves them
    repeated = [t for t in base if 3 <= t < 20]
    assert repeated and run(repetition_penalty=5.0) != base


def test_max_model_len_beyond_the_artifact_is_refused(artifact):
    compiled = load_artifact(artifact).manifest["max_model_len"]
    with kiln.LLM(artifact, num_kv_blocks=4, max_model_len=compiled - 1) as llm:
        assert llm.engine.max_model_len == compiled - 1
    with pytest.raises(ValueError, match=f"more than the {compiled} tokens .* was compiled for"):
        kiln.LLM(artifact, num_kv_blocks=4, max_model_len=compiled + 1)
    with pytest.raises(TypeError, match=r"kv_cache_gib.*num_kv_blocks"):  # names the options
        kiln.LLM(artifact, kv_cache_gib=1)


def test_requests_that_can_never_fit_are_rejected(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=4)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * 500], greedy(100), use_tqdm=False)
    with pytest.raises(ValueError, match="KV cache"):  # the first prompt, which fits, leaves too
        llm.generate([[1, 2], [1] * 60], greedy(10), use_tqdm=False)
    assert_idle(llm)


def test_a_request_that_fails_to_queue_leaves_nothing_behind(artifact, monkeypatch):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    with pytest.raises(ValueError, match="invalid seed"):
        kiln.SamplingParams(seed=2**63)
    seeded = kiln.SamplingParams(max_tokens=3, temperature=1.0, seed=2**63 - 1, n=2)

    def refuse(seed, device):
        raise RuntimeError(f"no generator for seed {seed}")

    monkeypatch.setattr("runtime.engine.make_generator", refuse)
    with pytest.raises(RuntimeError, match="no generator"):
        llm.engine.add_request("r0", [1, 2, 3], seeded)
    assert_idle(llm)  # nothing queued: the next steps serve others as usual
    monkeypatch.undo()
    out = llm.generate([[1, 2, 3]], seeded, use_tqdm=False)[0]  # seed + 1 past 2**63 - 1
    assert [len(o.token_ids) for o in out.outputs] == [3, 3]
    assert_idle(llm)


def test_ids_outside_the_vocabulary_and_stop_strings_without_tokenizer_are_refused(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    assert llm.tokenizer is None
    vocab = llm.engine.vocab_size
    for field, params in (
        ("logit_bias", kiln.SamplingParams(logit_bias={vocab: 1.0})),
        ("logit_bias", kiln.SamplingParams(logit_bias={-1: 100.0})),
        ("stop_token_ids", kiln.SamplingParams(stop_token_ids=[vocab], min_tokens=2)),
        ("tokenizer", kiln.SamplingParams(stop=["a"])),
        ("tokenizer", kiln.SamplingParams(bad_words=["a"])),
        ("bad_words", kiln.SamplingParams(bad_words_token_ids=[[1, vocab]])),
        (
            "bad_words ban each one",
            kiln.SamplingParams(allowed_token_ids=[5, 6], bad_words_token_ids=[[5], [6], [7, 8]]),
        ),
    ):
        with pytest.raises(ValueError, match=field):
            llm.generate([[1, 2, 3]], params, use_tqdm=False)
        assert_idle(llm)
    assert llm.generate([[1, 2, 3]], greedy(4), use_tqdm=False)[0].token_ids


def test_aborting_n_samples_keeps_the_finished_ones_reasons(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    sampled = kiln.SamplingParams(max_tokens=40, temperature=1.0, seed=3, n=2, ignore_eos=True)
    first, second = (o.token_ids for o in llm.generate([[1, 2, 3]], sampled)[0].outputs)
    stop = next(t for t in first[2:] if t not in second[:30])  # ends sample 0 only
    params = replace(sampled, stop_token_ids=(stop,))
    llm.engine.add_request("r", [1, 2, 3], params)
    acc = None
    while acc is None or acc.outputs[0].finish_reason is None:
        for update in llm.engine.step():
            acc = merge_update(acc, update)
    acc = merge_update(acc, llm.engine.abort("r"))
    assert [(o.finish_reason, o.stop_reason) for o in acc.outputs] == [
        ("stop", stop),
        ("abort", None),
    ]
    while llm.engine.has_unfinished():  # asynchronous: the step in flight lands, sends nothing
        assert llm.engine.step() == []
    assert_idle(llm)


def test_async_engine_streams_and_aborts(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=128)
    prompt = list(range(5, 25))
    expected = llm.generate([prompt], greedy(10), use_tqdm=False)[0].token_ids
    asyncio.run(stream_then_abort(AsyncEngine(ThreadCore(llm.engine)), prompt, expected))


def test_async_engine_in_a_process_of_its_own_streams_and_aborts(artifact, scheduling):
    config = EngineConfig(num_kv_blocks=128, async_scheduling=scheduling)
    prompt = list(range(5, 25))
    llm = kiln.LLM(artifact, num_kv_blocks=128)
    expected = llm.generate([prompt], greedy(10), use_tqdm=False)[0].token_ids
    front = AsyncEngine(ProcessCore(functools.partial(Engine.load, artifact, config)))
    here = llm.engine
    assert (front.max_model_len, front.vocab_size, front.kv_cache_tokens) == (
        here.max_model_len,
        here.vocab_size,
        here.runner.num_tokens,
    )
    asyncio.run(stream_then_abort(front, prompt, expected))
    assert front.core.exitcode == 0


def out_of_memory():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_an_engine_process_that_cannot_start_raises_its_error(tmp_path):
    with pytest.raises(ArtifactError, match="not a Kiln artifact"):
        AsyncEngine(ProcessCore(functools.partial(Engine.load, tmp_path)))
    with pytest.raises(RuntimeError, match="out of memory"):  # for the CLI's advice
        AsyncEngine(ProcessCore(out_of_memory))


def test_an_engine_process_ignores_signals_and_its_death_fails_every_stream(artifact):
    """A Ctrl-C reaches the whole process group: the server drains, the engine runs on.
    Once the engine's process is gone, streams end with EngineDeadError, not silence."""
    front = AsyncEngine(ProcessCore(functools.partial(Engine.load, artifact)))

    async def run():
        os.kill(front.core.pid, signal.SIGINT)
        os.kill(front.core.pid, signal.SIGTERM)
        updates = [u async for u in front.generate("a", [5, 6], greedy(4))]
        assert sum(len(u.token_ids) for u in updates) == 4
        stream = front.generate("b", [5, 6], greedy(400))
        await anext(stream)
        assert front.stats()["num_running"] == 1  # sent with b's first token
        os.kill(front.core.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match="exited"):
            async for _ in stream:
                pass
        assert not front.is_alive
        stats = front.stats()  # the dead engine's last figures would still show "b"
        assert (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0)
        assert stats["prefix_cache_queries"] > 0
        with pytest.raises(EngineDeadError):
            await anext(front.generate("c", [5, 6], greedy(4)))
        await front.shutdown(timeout=1)

    asyncio.run(run())


def engine_with_a_child(path) -> Engine:
    """An engine that started a process of its own, which holds every inherited pipe open."""
    subprocess.Popen(["sleep", "10"], close_fds=False, start_new_session=True)  # ends itself
    return Engine.load(path)


def test_an_engine_process_death_is_seen_though_its_child_keeps_the_pipe(artifact):
    front = AsyncEngine(ProcessCore(functools.partial(engine_with_a_child, artifact)))

    async def run():
        stream = front.generate("b", [5, 6], greedy(400))
        await anext(stream)
        os.kill(front.core.pid, signal.SIGKILL)

        async def rest():
            async for _ in stream:
                pass

        with pytest.raises(EngineDeadError, match="exited"):  # no EOF on the pipe: waitpid
            await asyncio.wait_for(rest(), 8)

    asyncio.run(run())
    front.core.join(1)


async def stream_then_abort(engine, prompt, expected):
    got = []
    async for update in engine.generate("a", prompt, greedy(10)):
        got += update.token_ids
    assert got == expected
    stream = engine.generate("b", prompt, greedy(200))
    await anext(stream)
    await stream.aclose()  # a client that went away
    for _ in range(100):
        if engine.stats()["num_running"] == 0:
            break
        await asyncio.sleep(0.02)
    stats = engine.stats()
    assert (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"]) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="max_model_len"):
        async for _ in engine.generate("c", [1] * 600, greedy(10)):
            pass
    first, got = engine.generate("d", prompt, greedy(10)), []
    got += (await anext(first)).token_ids
    with pytest.raises(ValueError, match="already in use"):  # and "d" runs on
        await anext(engine.generate("d", prompt, greedy(10)))
    async for update in first:
        got += update.token_ids
    assert got == expected
    await engine.shutdown(timeout=1)
    assert not engine.is_alive


def test_sampling_defaults_come_from_the_generation_config(artifact):

    llm = kiln.LLM(artifact, num_kv_blocks=16)
    llm.engine.artifact = replace(
        llm.engine.artifact, generation_config={"temperature": 0.6, "top_k": 20}
    )
    params = llm.default_params(max_tokens=3)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.6, 20, 3)
    assert kiln.SamplingParams().temperature == 1.0  # no generation config: vLLM's defaults


def test_steps_return_tokens_a_call_later_when_asynchronous(artifact, scheduling):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    assert llm.engine.async_scheduling == scheduling
    llm.engine.add_request("a", list(range(30)), greedy(3))
    deltas = []
    while llm.engine.has_unfinished():
        deltas.append([t for u in llm.engine.step() for t in u.token_ids])
    expected = alone(artifact, [list(range(30))], [greedy(3)])[0]
    # asynchronous: the prefill's token comes out of the second call, the last token of
    # the last; no step runs past max_tokens
    assert deltas == ([[], *[[t] for t in expected]] if scheduling else [[t] for t in expected])
    assert_idle(llm)


def test_stop_tokens_end_requests_as_they_would_alone(artifact):
    prompts, _ = workload(12, seed=4)
    base = alone(artifact, prompts, [greedy(16)] * len(prompts))
    # each request stops at its own 5th token; requests that stop send no more tokens
    params = [
        kiln.SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=[b[4]]) for b in base
    ]
    outs = kiln.LLM(artifact, num_kv_blocks=512).generate(prompts, params, use_tqdm=False)
    for out, b in zip(outs, base):
        stop = b.index(b[4]) + 1
        assert out.token_ids == b[:stop] and out.outputs[0].finish_reason == "stop"


def test_generated_blocks_are_cached_by_their_real_tokens(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=128)
    prompt = list(range(7, 27))
    # 45 tokens: the 44th, at position 63, is computed (and pending, asynchronously) in the
    # last step; the first 64 tokens fill 4 blocks, two of them with generated tokens
    first = llm.generate([prompt], greedy(45), use_tqdm=False)[0].token_ids
    follow = prompt + first[:44] + [1, 2, 3]
    out = llm.generate([follow], greedy(6), use_tqdm=False)[0]
    assert out.num_cached_tokens == 64
    cold = kiln.LLM(artifact, num_kv_blocks=128, enable_prefix_caching=False)
    assert out.token_ids == cold.generate([follow], greedy(6), use_tqdm=False)[0].token_ids
    assert_idle(llm)


def test_logprobs_requests_join_and_leave_a_greedy_batch(artifact):
    # greedy and seeded requests with logprobs among plain greedy ones: with asynchronous
    # scheduling their logprobs travel back with the tokens; every request's tokens and
    # logprobs as when it runs alone (synchronously)
    prompts, params = workload(6, seed=5)
    for top, sp in ((2, greedy(5)), (0, greedy(4)), (5, kiln.SamplingParams(max_tokens=6, seed=3))):
        prompts.append([(11 * top + i) % 160 for i in range(20 + top)])
        params.append(replace(sp, logprobs=top))
    outs = kiln.LLM(artifact, num_kv_blocks=512).generate(prompts, params, use_tqdm=False)
    expected = alone_outputs(artifact, prompts, params)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    for out, ref, sp in zip(outs[-3:], expected[-3:], params[-3:]):
        got = out.outputs[0].logprobs
        assert len(got) == len(out.token_ids) == len(ref.logprobs)
        for token, entry, ref_entry in zip(out.token_ids, got, ref.logprobs):
            assert token in entry and len(entry) >= sp.logprobs
            assert entry.keys() == ref_entry.keys()
            for t, lp in entry.items():
                assert (
                    lp.rank == ref_entry[t].rank and lp.decoded_token == ref_entry[t].decoded_token
                )
                assert lp.logprob == pytest.approx(ref_entry[t].logprob, abs=1e-5)


def test_logprobs_come_a_call_later_when_asynchronous(artifact, scheduling):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    params = replace(greedy(3), logprobs=1)
    llm.engine.add_request("a", list(range(30)), params)
    updates = []
    while llm.engine.has_unfinished():
        updates.append(llm.engine.step())
    expected = alone_outputs(artifact, [list(range(30))], [params])[0]
    # a logprobs request keeps the overlap: its first token and logprobs land a call later
    assert [len(u) for u in updates] == ([0, 1, 1, 1] if scheduling else [1, 1, 1])
    got = [u[0].outputs[0] for u in updates if u]
    assert [t for o in got for t in o.token_ids] == expected.token_ids
    assert [lp for o in got for lp in o.logprobs] == expected.logprobs
    assert_idle(llm)


def test_an_interrupted_step_is_taken_back(artifact):
    """A step whose forward raised (Ctrl-C, out of memory) leaves no trace: the blocks it
    registered never reach the prefix cache unwritten, the step before it still lands, and
    the engine goes on."""
    prompt = [(7 * i) % 160 for i in range(67)]
    expected = alone(artifact, [prompt, prompt[:20]], [greedy(8), greedy(6)])
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    llm.engine.add_request("short", prompt[:20], greedy(6))
    results = {u.request_id: u for u in llm.engine.step()}  # asynchronous: token in flight
    execute = llm.engine.runner.execute

    def interrupted(chunks, carried=None):
        llm.engine.runner.execute = execute
        raise KeyboardInterrupt

    llm.engine.runner.execute = interrupted
    llm.engine.add_request("long", prompt, greedy(8))
    with pytest.raises(KeyboardInterrupt):
        llm.engine.step()
    llm.engine.abort("long")  # its blocks go back before their K/V was ever written
    while llm.engine.has_unfinished():
        for update in llm.engine.step():
            results[update.request_id] = merge_update(results.get(update.request_id), update)
    assert results["short"].token_ids == expected[1]
    # cached: the block "short" computed, none of the interrupted prefill; then its own run's
    for cached in (16, 64):
        again = llm.generate([prompt], greedy(8), use_tqdm=False)[0]
        assert again.token_ids == expected[0] and again.num_cached_tokens == cached
    assert_idle(llm)


def test_generate_interrupted_leaves_no_request_behind(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    step = llm.engine.step
    calls = []

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    llm.engine.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate([list(range(10)), list(range(20))], greedy(20), use_tqdm=False)
    llm.engine.step = step
    while llm.engine.has_unfinished():  # asynchronous: a step in flight lands, sends nothing
        assert llm.engine.step() == []
    assert_idle(llm)


def test_token_ids_must_be_ints(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    for bad in ([1.5, 2.0], [True, 3]):
        with pytest.raises(ValueError, match="token ids must be ints"):
            llm.engine.add_request("bad", bad, greedy(2))
    assert not llm.engine.requests
    engine = AsyncEngine(ThreadCore(llm.engine))

    async def run():
        with pytest.raises(ValueError, match="must be ints"):  # that request's error only
            async for _ in engine.generate("bad", ["a", "b"], greedy(2)):
                pass
        got = [t async for u in engine.generate("good", [1, 2, 3], greedy(4)) for t in u.token_ids]
        assert len(got) == 4 and engine.is_alive
        await engine.shutdown(timeout=1)

    asyncio.run(run())


def test_allowed_token_ids_are_all_it_samples(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    allowed = (11, 23, 42, 99)
    params = kiln.SamplingParams(max_tokens=12, temperature=1.0, seed=3, allowed_token_ids=allowed)
    [out] = llm.generate([[1, 2, 3]], params, use_tqdm=False)
    assert len(out.token_ids) == 12 and set(out.token_ids) <= set(allowed)
    ends = kiln.SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=(7,))
    with pytest.raises(ValueError, match="min_tokens"):  # it could pick nothing at first
        llm.engine.add_request("ends", [1, 2], replace(ends, allowed_token_ids=(7,)))
    llm.engine.add_request("ok", [1, 2], replace(ends, allowed_token_ids=(7, 8)))


WORDS = [a + b for a, b in itertools.product(string.ascii_lowercase, repeat=2)][:79]


@pytest.fixture(scope="module")
def worded_artifact(tmp_path_factory):
    """The tiny qwen3 with a word-level tokenizer of its 160 ids: each word of WORDS alone
    (id 2k) and after a space (2k + 1, "Ġ" + word, as a byte-level BPE has it), <unk>, </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: 2 * k for k, w in enumerate(WORDS)} | {
        "Ġ" + w: 2 * k + 1 for k, w in enumerate(WORDS)
    }
    raw = Tokenizer(models.WordLevel(vocab | {"<unk>": 158, "</s>": 159}, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    out = tmp_path_factory.mktemp("worded") / "qwen3"
    return kiln.compile(tiny_model("qwen3"), out, tokenizer=tok)


def test_bad_words_never_appear_in_greedy_outputs(worded_artifact):
    llm = kiln.LLM(worded_artifact, num_kv_blocks=64)
    prompt = "aa ab ac"
    base = llm.generate([prompt], greedy(24), use_tqdm=False)[0].outputs[0].token_ids
    # the token greedy picks first, banned as its word: alone and after a space
    word = WORDS[base[0] // 2]
    [out] = llm.generate([prompt], replace(greedy(24), bad_words=[word]), use_tqdm=False)
    ids = out.outputs[0].token_ids
    assert len(ids) == 24 and ids[0] != base[0]
    assert not {base[0] // 2 * 2, base[0] // 2 * 2 + 1} & set(ids)
    # two words, the second after a space (as mid-text): banned right after the first only,
    # so the output is greedy's up to the first word, then turns away from the second
    i = next(i for i in range(1, 23) if base[i + 1] % 2 and base[i] not in base[:i])
    pair = f" {WORDS[base[i] // 2]} {WORDS[base[i + 1] // 2]}"
    [out] = llm.generate([prompt], replace(greedy(24), bad_words=[pair]), use_tqdm=False)
    ids = out.outputs[0].token_ids
    assert len(ids) == 24 and ids[: i + 1] == base[: i + 1] and ids[i + 1] != base[i + 1]
    assert (base[i], base[i + 1]) not in set(itertools.pairwise(ids))
    assert_idle(llm)


def test_async_engine_keeps_a_closed_streams_id_until_its_request_is_aborted(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    prompt = list(range(5, 25))
    expected = alone(artifact, [prompt], [greedy(5)])[0]
    engine = AsyncEngine(ThreadCore(llm.engine))

    async def run():
        stream = engine.generate("x", prompt, greedy(200))
        await anext(stream)
        await stream.aclose()  # the abort is queued to the engine thread
        while True:  # the id is taken until the old request is gone, then free again
            try:
                got = [
                    t async for u in engine.generate("x", prompt, greedy(5)) for t in u.token_ids
                ]
                break
            except ValueError as e:
                assert "already in use" in str(e)
                await asyncio.sleep(0.01)
        assert got == expected  # none of the old request's tokens or its abort
        await engine.shutdown(timeout=1)

    asyncio.run(run())


def test_async_engine_wakes_its_consumers_loop_once_a_step(artifact):
    """A step's updates for every stream reach the asyncio loop in one call, not one each."""
    llm = kiln.LLM(artifact, num_kv_blocks=128)
    prompts = [list(range(5 + i, 25 + i)) for i in range(6)]
    expected = alone(artifact, prompts, [greedy(8)] * 6)
    steps, wakeups = [], []
    step = llm.engine.step
    llm.engine.step = lambda: steps.append(1) or step()
    engine = AsyncEngine(ThreadCore(llm.engine))

    async def run():
        loop = asyncio.get_running_loop()
        call = loop.call_soon_threadsafe

        def counted(*args, **kwargs):
            if threading.current_thread().name == "kiln-engine":
                wakeups.append(1)
            return call(*args, **kwargs)

        loop.call_soon_threadsafe = counted

        async def tokens(i):
            return [
                t
                async for u in engine.generate(f"r{i}", prompts[i], greedy(8))
                for t in u.token_ids
            ]

        got = await asyncio.gather(*(tokens(i) for i in range(6)))
        await engine.shutdown(timeout=1)
        return got

    assert asyncio.run(run()) == expected
    assert len(wakeups) <= len(steps) < 6 * 8  # before: a wake-up per update, 48 or more


def test_async_engine_serves_waiting_requests_by_priority(artifact):
    """One sequence at a time: once the first request is done, the more urgent of the two
    waiting ones runs, though it came later."""
    llm = kiln.LLM(artifact, num_kv_blocks=128, max_num_seqs=1, policy="priority")
    engine = AsyncEngine(ThreadCore(llm.engine))
    assert engine.scheduling_policy == "priority"
    finished = []

    async def run(request_id, priority, tokens):
        async for update in engine.generate(request_id, [5, 6, 7], greedy(tokens), None, priority):
            if update.finished:
                finished.append(request_id)

    async def main():
        first = asyncio.create_task(run("first", -10, 24))  # never preempted for the others
        while not llm.engine.requests:
            await asyncio.sleep(0.001)
        await asyncio.gather(first, run("later", 5, 2), run("urgent", 1, 2))
        await engine.shutdown(timeout=1)

    asyncio.run(main())
    assert finished == ["first", "urgent", "later"]


def test_async_engine_on_update_sees_updates_as_they_arrive_not_as_they_are_pulled(artifact):
    """A consumer that pulls nothing until the request is done still had every update
    observed, in order, before its first pull; one that leaves has nothing observed after."""
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    prompt = list(range(5, 25))
    expected = alone(artifact, [prompt], [greedy(6)])[0]
    engine = AsyncEngine(ThreadCore(llm.engine))

    async def run():
        seen, pulled, done = [], [], asyncio.Event()

        def on_update(update):
            seen.append((time.monotonic(), update))
            if update.finished:
                done.set()

        stream = engine.generate("slow", prompt, greedy(6), on_update=on_update)
        first = asyncio.create_task(anext(stream))  # starts the request, as a handler would
        await asyncio.wait_for(done.wait(), 60)  # no pull yet but this one, still waiting
        pulled.append((time.monotonic(), await first))
        async for update in stream:
            await asyncio.sleep(0.05)  # a slow consumer
            pulled.append((time.monotonic(), update))
        assert [u for _, u in seen] == [u for _, u in pulled]  # the same objects, in order
        assert [t for _, u in pulled for t in u.token_ids] == expected
        assert seen[-1][0] <= pulled[0][0]  # the last was observed before the first was pulled

        left = []
        stream = engine.generate("left", prompt, greedy(200), on_update=left.append)
        await anext(stream)
        await stream.aclose()  # the consumer leaves: what the engine still sends is not seen
        count = len(left)
        for _ in range(250):
            if engine.stats()["num_running"] == 0 and "left" not in engine._streams:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # deliveries already on their way to this loop land
        assert len(left) == count and "left" not in engine._streams
        await engine.shutdown(timeout=1)

    asyncio.run(run())


def test_async_engine_on_update_that_raises_is_logged_and_the_streams_go_on(artifact, caplog):
    """Two requests run together: one's callback raises on every update, the other's
    records; both consumers get every update and finish, the other callback sees them all."""
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    prompts = [list(range(5, 25)), list(range(7, 19))]
    expected = alone(artifact, prompts, [greedy(8)] * 2)
    engine = AsyncEngine(ThreadCore(llm.engine))
    seen = []

    def broken(update):
        raise RuntimeError("observer bug")

    async def updates(request_id, prompt, on_update):
        return [
            u async for u in engine.generate(request_id, prompt, greedy(8), on_update=on_update)
        ]

    async def run():
        both = (updates("broken", prompts[0], broken), updates("seen", prompts[1], seen.append))
        got = await asyncio.wait_for(asyncio.gather(*both), 60)  # a lost update: no hang
        assert engine.is_alive
        await engine.shutdown(timeout=1)
        return got

    with caplog.at_level(logging.ERROR, logger="runtime.async_engine"):
        broken_updates, seen_updates = asyncio.run(run())
    assert [[t for u in us for t in u.token_ids] for us in (broken_updates, seen_updates)] == (
        expected
    )
    assert seen == seen_updates and broken_updates[-1].finished and seen_updates[-1].finished
    failures = [r for r in caplog.records if "on_update" in r.getMessage()]
    assert len(failures) == len(broken_updates) and all(r.exc_info for r in failures)
