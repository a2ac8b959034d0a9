"""What the engine tells operators beyond /metrics' gauges: the buckets of its tokens-per-step
histogram, and the line it logs every LOG_INTERVAL_S while it works (vLLM's)."""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
# vLLM's buckets for kiln:iteration_tokens_total, the tokens one engine step runs
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def stats_line(before: dict, after: dict, seconds: float) -> str | None:
    """vLLM's stats line for the `seconds` between two snapshots of `Engine.stats()`: token
    rates and the prefix-cache hit rate over that time, the queues and the cache as they are
    at its end. None when no token ran in it."""
    if after["computed_tokens"] == before["computed_tokens"]:
        return None

    def delta(key: str) -> int:
        return after[key] - before[key]

    queries = delta("prefix_cache_queries")
    hit_rate = delta("prefix_cache_hits") / queries if queries else 0.0
    return (
        f"Avg prompt throughput: {delta('prompt_tokens') / seconds:.1f} tokens/s, "
        f"Avg generation throughput: {delta('generation_tokens') / seconds:.1f} tokens/s, "
        f"Running: {after['num_running']} reqs, Waiting: {after['num_waiting']} reqs, "
        f"GPU KV cache usage: {after['kv_cache_usage']:.1%}, "
        f"Prefix cache hit rate: {hit_rate:.1%}"
    )


class StatsLogger:
    """Logs `stats_line` at INFO at most every `interval` s, over the time since the last
    snapshot. `tick` takes the loop's clock; between lines it only compares it."""

    def __init__(
        self, stats: Callable[[], dict], now: float, interval: float = LOG_INTERVAL_S
    ) -> None:
        self.stats = stats
        self.interval = interval
        self.last = stats()
        self.last_time = now

    def tick(self, now: float) -> None:
        if now - self.last_time < self.interval or now == self.last_time:
            return
        stats = self.stats()
        line = stats_line(self.last, stats, now - self.last_time)
        if line is not None:
            log.info(line)
        self.last, self.last_time = stats, now
