"""W4's pieces (benchmarks/serving.py): its workload, its metrics, its streaming client against
the server (a fake engine that takes a known time a token) and its transformers peer."""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import time

import pytest
from aiohttp import web
from conftest import tiny_model
from fake_engine import FakeEngine

from benchmarks.common import cpu_seconds
from benchmarks.serving import (
    HFPeer,
    Record,
    Request,
    arrivals,
    requests,
    run_kiln,
    summarize,
)
from server import ServerConfig, create_app

TOKEN_S = 0.02  # the fake engine's time a token


def test_requests_have_the_asked_mean_lengths_and_fit():
    reqs = requests(4000, vocab=1000, mean_in=200, mean_out=180, max_len=2048)
    ins, outs = [len(r.prompt) for r in reqs], [r.output_len for r in reqs]
    # log-normal, sigma 1: the clip at 1024 takes ~1.7% of the draws, a few % of the mean
    assert 185 < statistics.mean(ins) < 205 and 165 < statistics.mean(outs) < 185
    assert statistics.median(ins) < 0.7 * statistics.mean(ins)  # ShareGPT's long tail
    assert max(ins) == 1024 and min(ins) >= 4 and all(i + o <= 2048 for i, o in zip(ins, outs))
    assert all(0 <= t < 1000 for r in reqs[:50] for t in r.prompt)
    assert requests(3, 1000, 200, 180, 2048) == requests(3, 1000, 200, 180, 2048, seed=0)
    assert requests(3, 1000, 200, 180, 2048) != requests(3, 1000, 200, 180, 2048, seed=1)
    # another run: the same lengths, other prompts (nothing for a prefix cache to find)
    first, again = requests(3, 1000, 200, 180, 2048), requests(3, 1000, 200, 180, 2048, run=1)
    assert [(len(r.prompt), r.output_len) for r in again] == [
        (len(r.prompt), r.output_len) for r in first
    ]
    assert all(a.prompt[:4] != b.prompt[:4] for a, b in zip(again, first, strict=True))


def test_arrivals_are_a_poisson_process_at_the_rate():
    times = arrivals(20000, rate=10.0)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0.0 and all(g >= 0 for g in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.1, rel=0.03)
    assert statistics.stdev(gaps) == pytest.approx(0.1, rel=0.05)  # exponential: sd = mean
    assert arrivals(5, float("inf")) == [0.0] * 5
    assert arrivals(5, 2.0) == arrivals(5, 2.0) != arrivals(5, 3.0)


def test_summarize_percentiles_tpot_and_goodput():
    # first token 0.1 s after sending, then a chunk every 0.01 s (a: 5 tokens) or 0.05 s
    # (b: 4 tokens, one chunk of 2); c: a single token after 2 s
    a = Record(0.0, [0.1, 0.11, 0.12, 0.13, 0.14], [1] * 5)
    b = Record(1.0, [1.1, 1.15, 1.2], [1, 2, 1])
    c = Record(0.0, [2.0], [1])
    row = summarize("x", 4.0, [a, b, c], seconds=2.0, slo=(0.5, 0.02))
    assert (row["requests"], row["req_s"], row["out_tok_s"]) == (3, 1.5, 5.0)
    assert row["ttft_p50_ms"] == 100.0 and row["tpot_p50_ms"] == pytest.approx(21.67)  # 10 and 33.3
    assert b.tpot == pytest.approx(0.1 / 3)  # (e2e - ttft) / (tokens - 1)
    assert row["itl_p50_ms"] == pytest.approx(10.0)  # 4 gaps of 10 ms, 2 of 50 ms
    assert row["goodput_req_s"] == 0.5  # a alone: b's TPOT and c's TTFT miss their SLOs


def test_client_times_streamed_tokens():
    engine = FakeEngine(None, max_model_len=256, vocab_size=1000)  # no tokenizer: no text
    engine.token_delay = TOKEN_S
    reqs = [Request([1, 2, 3], 6), Request([4] * 30, 1), Request([5, 6], 4)]
    times = [0.0, 0.05, 0.3]

    async def run():
        runner = web.AppRunner(create_app(engine, ServerConfig()))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            got = await run_kiln(url, reqs, times)
            with pytest.raises(RuntimeError, match="HTTP 400"):  # past max_model_len
                await run_kiln(url, [Request([1] * 300, 4)], [0.0])
            return got
        finally:
            await runner.cleanup()

    records, seconds = asyncio.run(run())
    assert [r.tokens for r in records] == [6, 1, 4]
    assert [c.prompt_token_ids for c in engine.calls[:3]] == [r.prompt for r in reqs]
    sent = [r.sent - records[0].sent for r in records]
    assert sent == pytest.approx(times, abs=0.1)  # each sent at its arrival time
    assert all(r.ttft >= TOKEN_S for r in records)
    assert all(TOKEN_S <= g < 4 * TOKEN_S for r in records for g in r.gaps)
    assert seconds >= 0.3 + 4 * TOKEN_S


def test_transformers_peer_streams_every_token():
    model = tiny_model("llama")
    peer = HFPeer(model, max_new_tokens=8)
    try:
        reqs = [Request([3, 4, 5], 8), Request([7] * 9, 2), Request([9, 8], 5)]
        records, seconds = peer.run(reqs, [0.0, 0.0, 0.2])
        again, _ = peer.run(reqs[:1], [0.0])  # a second run on the same manager
    finally:
        peer.stop()
    assert [r.tokens for r in records] == [8, 2, 5] and again[0].tokens == 8
    assert records[2].sent - records[0].sent == pytest.approx(0.2, abs=0.1) and seconds > 0.2
    assert all(r.ttft > 0 and r.times == sorted(r.times) for r in records)


def test_cpu_seconds_of_this_process_and_of_another():
    before, own = cpu_seconds(), cpu_seconds(os.getpid())
    sum(i * i for i in range(3_000_000))  # ~0.2 s of CPU here
    spent = cpu_seconds() - before
    assert spent > 0.05 and cpu_seconds(os.getpid()) - own == pytest.approx(spent, abs=0.05)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        start = cpu_seconds(busy.pid)
        time.sleep(0.5)
        assert cpu_seconds(busy.pid) - start > 0.2  # a core busy for most of the 0.5 s
    finally:
        busy.kill()
        busy.wait()
