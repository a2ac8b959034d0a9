"""/metrics beyond the app's own counters: the engine's preemptions and tokens per step, and
what a request's timer observes once it finishes (sizes, time per output token, phases)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.outputs import CompletionOutput, RequestOutput, RequestTimes
from server.metrics import Metrics, token_buckets

NAME = "m"


class Engine:
    """What the collector reads: max_model_len and stats()."""

    max_model_len = 300

    def stats(self) -> dict:
        return {
            "num_running": 1,
            "num_waiting": 0,
            "kv_cache_usage": 0.5,
            "prefix_cache_queries": 10,
            "prefix_cache_hits": 4,
            "num_preemptions": 7,
            # steps of 1 token (3), of 2..8 (0), of 9..16 (1), and of more than 16384 (1)
            "iteration_tokens": (3, 0, 1) + (0,) * 10 + (1,),
            "computed_tokens": 20_015,
        }


def samples(metrics: Metrics) -> dict[str, float]:
    """Each sample of the exposition by name, a bucket's with its bound: `name{le}`."""
    body, _ = metrics.render("")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            assert s.labels["model_name"] == NAME
            out[s.name + (f"{{{s.labels['le']}}}" if "le" in s.labels else "")] = s.value
    return out


@pytest.fixture
def clock(monkeypatch) -> SimpleNamespace:
    """The metrics' clock, set by the test."""
    clock = SimpleNamespace(now=100.0)
    monkeypatch.setattr("server.metrics.time", SimpleNamespace(monotonic=lambda: clock.now))
    return clock


def update(tokens: list[list[int]], finished=False, times=None, reasons=None) -> RequestOutput:
    """An update with one delta per sequence (its new tokens), finished with `reasons`."""
    outs = [
        CompletionOutput(i, token_ids=ids, finish_reason=reasons and reasons[i])
        for i, ids in enumerate(tokens)
    ]
    return RequestOutput("r", None, [1, 2, 3], outs, finished, 0, None, times)


def test_token_buckets_are_vllms_up_to_max_model_len() -> None:
    assert token_buckets(2048) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
    assert token_buckets(1) == (1,)
    assert token_buckets(5000)[-1] == 5000


def test_engine_preemptions_and_tokens_per_step_are_exposed() -> None:
    got = samples(Metrics(Engine(), NAME))
    assert got["kiln:num_preemptions_total"] == 7
    buckets = {le: got[f"kiln:iteration_tokens_total_bucket{{{le}}}"] for le in
               ("1.0", "8.0", "16.0", "32.0", "16384.0", "+Inf")}  # fmt: skip
    assert buckets == {"1.0": 3, "8.0": 3, "16.0": 4, "32.0": 4, "16384.0": 4, "+Inf": 5}
    assert got["kiln:iteration_tokens_total_count"] == 5
    assert got["kiln:iteration_tokens_total_sum"] == 20_015


def test_a_finished_request_observes_its_sizes_time_per_token_and_phases(clock) -> None:
    metrics = Metrics(Engine(), NAME)
    timer = metrics.start(num_prompt_tokens=3, n=2, max_tokens=40)
    for t, tokens in ((100.5, [[5], [6]]), (101.0, [[7], [8]]), (102.5, [[9], []])):
        clock.now = t
        timer.observe(update(tokens))
    clock.now = 103.5
    times = RequestTimes(queue=0.25, prefill=0.75, decode=2.5)
    timer.observe(update([[10], [11]], True, times, ["length", "stop"]))
    got = samples(metrics)
    assert got["kiln:request_prompt_tokens_sum"] == 3
    assert got["kiln:request_prompt_tokens_bucket{2.0}"] == 0
    assert got["kiln:request_prompt_tokens_bucket{5.0}"] == 1
    assert got["kiln:request_generation_tokens_sum"] == 7  # both sequences'
    assert got["kiln:request_params_max_tokens_sum"] == 40
    # first token at 100.5, last at 103.5, over 4 steps: a token each 1 s
    assert got["kiln:request_time_per_output_token_seconds_sum"] == 1.0
    assert got["kiln:request_time_per_output_token_seconds_count"] == 1
    for phase, seconds in (("queue", 0.25), ("prefill", 0.75), ("decode", 2.5),
                           ("inference", 3.25)):  # fmt: skip
        assert got[f"kiln:request_{phase}_time_seconds_sum"] == seconds
        assert got[f"kiln:request_{phase}_time_seconds_count"] == 1
    assert got["kiln:request_queue_time_seconds_bucket{0.3}"] == 1
    assert got["kiln:e2e_request_latency_seconds_sum"] == 3.5


def test_phases_only_for_a_request_the_engine_finished_and_tpot_only_past_one_token(
    clock,
) -> None:
    metrics = Metrics(Engine(), NAME)
    timer = metrics.start(num_prompt_tokens=3, n=1, max_tokens=None)  # not observed
    timer.observe(update([[5]], True, None, ["abort"]))  # an engine shutdown's final update
    got = samples(metrics)
    assert got["kiln:request_generation_tokens_count"] == 1
    assert got["kiln:request_params_max_tokens_count"] == 0
    assert got["kiln:request_time_per_output_token_seconds_count"] == 0
    assert got["kiln:request_queue_time_seconds_count"] == 0
    left = metrics.start(num_prompt_tokens=3, n=1, max_tokens=8)
    left.observe(update([[5]]))
    left.end()  # the client left: nothing of its size is observed
    assert samples(metrics)["kiln:request_prompt_tokens_count"] == 1
