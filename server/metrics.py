"""Prometheus metrics with vLLM-compatible names under the `kiln:` prefix, one registry per app."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from runtime.outputs import RequestOutput
from runtime.stats import ITERATION_TOKENS_BUCKETS

# vLLM's buckets, so dashboards built for it read Kiln unchanged
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
# end to end, and the engine's phases of a request
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
LABELS = ["model_name"]
FINISH_REASONS = ("stop", "length", "abort")


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """vLLM's buckets for token counts: 1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    powers = (10**e for e in range(len(str(max_model_len))))
    return tuple(b for p in powers for b in (p, 2 * p, 5 * p) if b <= max_model_len)


class EngineCollector(Collector):
    """Reads the engine's scheduler and cache state, and its running totals, at scrape time."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.stats()
        for name, key, doc in (
            ("num_requests_running", "num_running", "Requests in the running batch."),
            ("num_requests_waiting", "num_waiting", "Requests waiting to be scheduled."),
            ("kv_cache_usage_perc", "kv_cache_usage", "Fraction of KV-cache blocks in use."),
        ):
            yield self._metric(GaugeMetricFamily, name, doc, stats[key])
        for name, key, doc in (
            ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up."),
            ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the cache."),
            ("num_preemptions", "num_preemptions", "Sequences preempted to free KV blocks."),
        ):
            yield self._metric(CounterMetricFamily, name, doc, stats[key])
        yield self._iteration_tokens(stats["iteration_tokens"], stats["computed_tokens"])

    def _metric(self, family: type, name: str, doc: str, value: float) -> Metric:
        metric = family(f"kiln:{name}", doc, labels=LABELS)
        metric.add_metric([self.model_name], value)
        return metric

    def _iteration_tokens(self, counts: tuple[int, ...], total: int) -> Metric:
        """The engine's steps by tokens run: its per-bucket counts made cumulative."""
        metric = HistogramMetricFamily(
            "kiln:iteration_tokens_total", "Tokens per engine step.", labels=LABELS
        )
        bounds = [floatToGoString(b) for b in ITERATION_TOKENS_BUCKETS] + ["+Inf"]
        buckets = list(zip(bounds, accumulate(counts), strict=True))
        metric.add_metric([self.model_name], buckets, total)
        return metric


class Metrics:
    """The app's registry: request counters and latency histograms, plus the engine's state."""

    def __init__(self, engine: Any, model_name: str) -> None:
        self.registry = reg = CollectorRegistry()

        def counter(name: str, doc: str) -> Any:
            return Counter(f"kiln:{name}", doc, LABELS, registry=reg).labels(model_name)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Any:
            metric = Histogram(f"kiln:{name}", doc, LABELS, registry=reg, buckets=buckets)
            return metric.labels(model_name)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens received.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between tokens.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", REQUEST_BUCKETS)
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "A request's time per output token: first token to last, over the gaps between.",
            ITL_BUCKETS,
        )
        self.queue_time, self.prefill_time, self.decode_time, self.inference_time = (
            histogram(f"request_{phase}_time_seconds", doc, REQUEST_BUCKETS)
            for phase, doc in (
                ("queue", "Arrival at the engine to first scheduled."),
                ("prefill", "First scheduled to first token."),
                ("decode", "First token to last."),
                ("inference", "First scheduled to last token."),
            )
        )
        tokens = token_buckets(engine.max_model_len)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens per request.", tokens
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Tokens a request generated (its n sequences).", tokens
        )
        self.max_tokens = histogram("request_params_max_tokens", "Requests' max_tokens.", tokens)
        self.success = Counter(
            "kiln:request_success",
            "Finished sequences (each of a request's n) by finish reason.",
            [*LABELS, "finished_reason"],
            registry=reg,
        )
        for reason in FINISH_REASONS:  # exported at 0 from the start, as vLLM does
            self.success.labels(model_name, reason)
        self.model_name = model_name
        reg.register(EngineCollector(engine, model_name))

    def finished(self, reason: str, count: int = 1) -> None:
        self.success.labels(self.model_name, reason).inc(count)

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition the scraper asked for (OpenMetrics or Prometheus text) and its type."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def start(self, num_prompt_tokens: int, n: int, max_tokens: int | None) -> RequestTimer:
        """The timer of a request as it reaches the engine; its max_tokens, if it has one, is
        observed once it finishes."""
        return RequestTimer(self, time.monotonic(), num_prompt_tokens, n, max_tokens)


class RequestTimer:
    """Observes one engine request's updates: token counts, TTFT, inter-token gaps, end to end,
    and how each of its n sequences finished; at its end, its sizes, its time per output
    token and, from its final update, the engine's phases. `observe` is the engine's
    `on_update`: it times each update as it reaches the server's event loop, however late the
    handler pulls it."""

    def __init__(
        self,
        metrics: Metrics,
        arrival: float,
        num_prompt_tokens: int,
        n: int,
        max_tokens: int | None,
    ) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.num_prompt_tokens = num_prompt_tokens
        self.unseen_prompt = num_prompt_tokens  # counted once the engine has run the prompt
        self.running = n  # sequences not finished yet
        self.max_tokens = max_tokens
        self.generated = 0  # tokens of all n sequences
        self.steps = 0  # updates that brought tokens: one per engine step

    def observe(self, output: RequestOutput) -> None:
        now = time.monotonic()
        if self.unseen_prompt:  # a request the engine refused never gets here
            self.metrics.prompt_tokens.inc(self.unseen_prompt)
            self.unseen_prompt = 0
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if new_tokens:
            self.metrics.generation_tokens.inc(new_tokens)
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrival)
                self.first = now
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
            self.generated += new_tokens
            self.steps += 1
        for choice in output.outputs:
            if choice.finish_reason is not None:
                self.metrics.finished(choice.finish_reason)
                self.running -= 1
        if output.finished:
            self.metrics.e2e.observe(now - self.arrival)
            self._finished(output)

    def _finished(self, output: RequestOutput) -> None:
        m = self.metrics
        m.request_prompt_tokens.observe(self.num_prompt_tokens)
        m.request_generation_tokens.observe(self.generated)
        if self.max_tokens is not None:
            m.max_tokens.observe(self.max_tokens)
        if self.steps > 1:  # vLLM's TPOT, (e2e - ttft) / (tokens - 1), a token a step
            m.tpot.observe((self.last - self.first) / (self.steps - 1))
        if (times := output.times) is not None:  # None: aborted
            m.queue_time.observe(times.queue)
            m.prefill_time.observe(times.prefill)
            m.decode_time.observe(times.decode)
            m.inference_time.observe(times.inference)

    def end(self) -> None:
        """The request's updates stopped: sequences that had not finished were aborted (the
        client left). A request the engine refused, whose prompt never ran, is not counted."""
        if not self.unseen_prompt and self.running > 0:
            self.metrics.finished("abort", self.running)
            self.running = 0
