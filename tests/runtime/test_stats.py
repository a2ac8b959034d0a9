"""The engine's stats line: rates between two snapshots, logged at most every interval and
only after work."""

from __future__ import annotations

import logging

from runtime.stats import StatsLogger, stats_line


def snapshot(computed=0, prompt=0, generated=0, queries=0, hits=0, running=0, waiting=0, kv=0.0):
    return {
        "computed_tokens": computed,
        "prompt_tokens": prompt,
        "generation_tokens": generated,
        "prefix_cache_queries": queries,
        "prefix_cache_hits": hits,
        "num_running": running,
        "num_waiting": waiting,
        "kv_cache_usage": kv,
    }


def test_the_line_has_vllms_figures_over_the_interval() -> None:
    before = snapshot(computed=100, prompt=100, generated=50, queries=1000, hits=900)
    after = snapshot(1100, 600, 550, 2000, 1250, running=3, waiting=2, kv=0.4567)
    assert stats_line(before, after, 10.0) == (
        "Avg prompt throughput: 50.0 tokens/s, Avg generation throughput: 50.0 tokens/s, "
        "Running: 3 reqs, Waiting: 2 reqs, GPU KV cache usage: 45.7%, "
        "Prefix cache hit rate: 35.0%"
    )
    assert stats_line(after, {**after, "num_waiting": 5}, 10.0) is None  # nothing ran
    # no prompt looked up in the interval: no hit rate to speak of
    assert stats_line(before, {**before, "computed_tokens": 101}, 10.0).endswith(": 0.0%")


def test_a_line_at_most_every_interval_and_only_after_work(caplog) -> None:
    stats = [snapshot()]
    logger = StatsLogger(lambda: stats[-1], now=0.0, interval=10.0)
    with caplog.at_level(logging.INFO, logger="runtime.stats"):
        stats.append(snapshot(computed=10, generated=10))
        logger.tick(9.9)  # too soon
        logger.tick(10.0)
        logger.tick(15.0)
        stats.append(snapshot(computed=20, generated=10))
        logger.tick(20.0)
        logger.tick(30.0)  # idle since
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[0].startswith(
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 1.0"
    )
    assert lines[1].startswith(
        "Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 0.0"
    )
