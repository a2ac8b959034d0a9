"""What the engine counts and times for /metrics and its stats line: tokens per step, prompt
and generated tokens, preemptions, and each finished request's queue, prefill and decode
times, in this process and across the engine process's pipe."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from types import SimpleNamespace

import pytest
from conftest import record_preemptions, tiny_model

import kiln
from runtime.async_engine import AsyncEngine, ThreadCore
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.engine_process import ProcessCore
from runtime.outputs import RequestTimes
from runtime.stats import StatsLogger


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    tiny_model("qwen3").save_pretrained(src, safe_serialization=True)
    return kiln.compile(str(src), tmp_path_factory.mktemp("art") / "qwen3")


def greedy(max_tokens):
    return kiln.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def preempting(artifact) -> Engine:
    """An engine whose pool (128 tokens) cannot hold its 4 requests (50 tokens each) at once."""
    engine = kiln.LLM(artifact, num_kv_blocks=8, max_num_batched_tokens=64).engine
    rng = random.Random(0)
    for i in range(4):
        engine.add_request(str(i), [rng.randrange(160) for _ in range(30)], greedy(20))
    return engine


@pytest.mark.usefixtures("scheduling")
def test_steps_are_counted_by_their_tokens_and_tokens_by_kind(artifact):
    llm = kiln.LLM(artifact, num_kv_blocks=64)
    llm.generate([list(range(20))], greedy(3), use_tqdm=False)
    stats = llm.engine.stats()
    # a prefill of 20 tokens (bucket le=32), then two one-token decodes (le=1)
    assert stats["iteration_tokens"] == (2, 0, 0, 1) + (0,) * 10
    assert stats["computed_tokens"] == 22
    assert (stats["prompt_tokens"], stats["generation_tokens"]) == (20, 3)


@pytest.mark.usefixtures("scheduling")
def test_phase_times_follow_the_steps_and_preemptions_are_counted(artifact, monkeypatch, caplog):
    """On a clock that advances 1 a step: queue time ends at the step that first scheduled
    the request (not at a readmission after a preemption), prefill at the step that output its
    first token, decode at the one that output its last. Each preemption is counted, the
    first warned of."""
    clock = SimpleNamespace(now=0.0)
    fake_time = SimpleNamespace(monotonic=lambda: clock.now)
    monkeypatch.setattr("runtime.engine.time", fake_time)
    monkeypatch.setattr("runtime.scheduler.time", fake_time)
    engine = preempting(artifact)
    preempted = record_preemptions(engine)
    scheduled, schedule = {}, engine.scheduler.schedule

    def recording():
        out = schedule()
        for chunk in out.chunks:
            scheduled.setdefault(chunk.seq.request_id, clock.now)
        return out

    engine.scheduler.schedule = recording
    first, done = {}, {}
    with caplog.at_level(logging.WARNING, logger="runtime.scheduler"):
        while engine.has_unfinished():
            clock.now += 1
            for out in engine.step():
                first.setdefault(out.request_id, clock.now)
                assert (out.times is None) is not out.finished
                if out.finished:
                    done[out.request_id] = (clock.now, out.times)
    assert preempted and len(done) == 4
    for request_id, (last, times) in done.items():
        start, token = scheduled[request_id], first[request_id]
        assert times == RequestTimes(start, token - start, last - token)
        assert times.inference == last - start
    assert engine.stats()["num_preemptions"] == len(preempted)
    warned = [r.getMessage().split()[1] for r in caplog.records if "preempted" in r.getMessage()]
    assert warned == [seq.request_id for seq in preempted][:1]  # the first; then every 50th


def test_the_final_update_brings_its_times_across_the_process_pipe(artifact):
    config = EngineConfig(num_kv_blocks=64)
    front = AsyncEngine(ProcessCore(functools.partial(Engine.load, artifact, config)))

    async def run():
        updates = [u async for u in front.generate("a", [5, 6, 7], greedy(4))]
        await front.shutdown(timeout=1)
        return updates

    updates = asyncio.run(run())
    assert [u.times is None for u in updates] == [True, True, True, False]
    times = updates[-1].times
    assert times.queue >= 0 and times.prefill > 0 and times.decode > 0
    stats = front.stats()  # as sent with the last update
    assert (stats["num_preemptions"], stats["computed_tokens"]) == (0, 6)
    assert stats["iteration_tokens"][:2] == (3, 1)  # three decodes, a prefill of 3


@pytest.mark.usefixtures("scheduling")
def test_the_engine_loop_logs_its_stats_line(artifact, monkeypatch, caplog):
    every_step = functools.partial(StatsLogger, interval=0.0)
    monkeypatch.setattr("runtime.async_engine.StatsLogger", every_step)
    engine = AsyncEngine(ThreadCore(kiln.LLM(artifact, num_kv_blocks=64).engine))

    async def run():
        async for _ in engine.generate("a", [5, 6, 7], greedy(4)):
            pass
        await engine.shutdown(timeout=1)

    with caplog.at_level(logging.INFO, logger="runtime.stats"):
        asyncio.run(run())
    lines = [r.getMessage() for r in caplog.records if r.name == "runtime.stats"]
    assert len(lines) == 4  # one after each step that ran tokens, none after the others
    assert all(line.startswith("Avg prompt throughput: ") for line in lines)
