"""A deterministic stand-in for the runtime's AsyncEngine, for tests."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from runtime.outputs import CompletionOutput, Logprob, RequestOutput
from runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """Named like the engine's own: the server recognises it by class name."""


@dataclass(frozen=True, slots=True)
class Call:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None
    priority: int = 0


def echo_token(prompt_token_ids: list[int], output_index: int, step: int) -> int:
    """Output j echoes the prompt, starting j tokens in, cycling when it runs out."""
    return prompt_token_ids[(step + output_index) % len(prompt_token_ids)]


def fake_logprobs(token: int, k: int, vocab_size: int) -> dict[int, Logprob]:
    """The sampled token at rank 1 (-0.25), then the next token ids at ranks 2..k (-rank)."""
    out = {token: Logprob(-0.25, 1)}
    for rank in range(2, k + 1):
        out[(token + rank - 1) % vocab_size] = Logprob(-float(rank), rank)
    return out


class FakeEngine:
    """One token per update and per output; records calls, closes, aborts and shutdowns.
    Each update is handed to `on_update` as it is made, before it is queued for the consumer.
    It is made `token_delay` s after the consumer asked for it; with `runs_ahead`, as in the
    real engine, one each `token_delay` s from the start, however late the consumer pulls."""

    model_name = "smollm2-fake"

    def __init__(self, tokenizer: Any, max_model_len: int = 512, vocab_size: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size or len(tokenizer)
        self.default_params = {"temperature": 0.6, "top_p": 0.9}
        self.kv_cache_tokens = 4096
        self.max_concurrency = 8.0
        self.scheduling_policy = "fcfs"
        self.reset()

    def reset(self) -> None:
        self.token_delay = 0.0
        self.runs_ahead = False
        self.calls: list[Call] = []
        self.closed: list[str] = []  # requests whose generator closed before they finished
        self.aborted: list[str] = []
        self.shutdowns: list[float] = []
        self.fail: Exception | None = None  # raised by the next generate, before any update
        self.fail_after: int | None = None  # updates before the next generate raises RuntimeError
        self.die_after: int | None = None  # updates before the engine dies under the next one
        self.reply: list[int] | None = None  # every output: these tokens, then "stop"
        self.cached_tokens = 0  # each update's num_cached_tokens: prompt tokens found cached
        self.dead = False
        self.stopping = False
        self.running = 0

    @property
    def is_alive(self) -> bool:
        return not self.dead

    def stats(self) -> dict:
        return {
            "num_running": self.running,
            "num_waiting": 2,
            "kv_cache_usage": 0.25,
            "prefix_cache_queries": 100,
            "prefix_cache_hits": 40,
            "num_preemptions": 3,
            "iteration_tokens": (1, 1) + (0,) * 12,  # two steps: of 1 token, and of 8
            "computed_tokens": 9,
        }

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    async def shutdown(self, timeout: float) -> None:
        self.shutdowns.append(timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.01)
        self.stopping = True  # what is still running finishes with "abort"
        while self.running:
            await asyncio.sleep(0.01)
        self.dead = True

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        priority: int = 0,
        on_update: Callable[[RequestOutput], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        self.calls.append(Call(request_id, list(prompt_token_ids), params, prompt, priority))
        if self.dead:
            raise EngineDeadError("the engine loop died")
        if (fail := self.fail) is not None:
            self.fail = None
            raise fail
        fail_after, self.fail_after = self.fail_after, None
        die_after, self.die_after = self.die_after, None
        self.running += 1
        queue: asyncio.Queue[RequestOutput | Exception | None] = asyncio.Queue()  # None: done
        asked = asyncio.Event()  # the consumer waits for the next update
        updates = enumerate(self._updates(request_id, prompt_token_ids, params, prompt))
        runs_ahead = self.runs_ahead

        async def produce() -> None:
            try:
                while True:
                    if not runs_ahead:
                        await asked.wait()
                        asked.clear()
                    count, out = next(updates, (-1, None))
                    if out is None:
                        break
                    if count == fail_after:
                        raise RuntimeError("scheduler exploded in /secret/path/engine.py")
                    if count == die_after:
                        self.dead = True
                        raise EngineDeadError("the engine died")
                    await asyncio.sleep(self.token_delay)
                    if on_update is not None:  # delivered: observed now, however late pulled
                        try:
                            on_update(out)
                        except Exception:
                            log.exception("on_update of a stream failed")
                    queue.put_nowait(out)
            except Exception as exc:  # the request's error, raised where it is pulled
                queue.put_nowait(exc)
            else:
                queue.put_nowait(None)

        producer = asyncio.create_task(produce())
        finished = False
        try:
            while True:
                asked.set()
                if (item := await queue.get()) is None:
                    break
                if isinstance(item, Exception):
                    raise item
                yield item
            finished = True
        finally:
            producer.cancel()
            self.running -= 1
            if not finished:
                self.closed.append(request_id)

    def _updates(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None,
    ) -> Iterator[RequestOutput]:
        """All updates, computed lazily; `stopping` ends every live output with "abort"."""
        tokens: list[list[int]] = [[] for _ in range(params.n)]
        texts = [""] * params.n
        live = list(range(params.n))
        reply = self.reply
        for step in range(params.max_tokens):
            for j in list(live):
                token = echo_token(prompt_token_ids, j, step) if reply is None else reply[step]
                tokens[j].append(token)
                text, finish, why = self._text(tokens[j], params)
                finish = "abort" if self.stopping else finish
                finish = finish or ("stop" if reply and step + 1 == len(reply) else None)
                finish = finish or ("length" if step + 1 == params.max_tokens else None)
                delta, texts[j] = text[len(texts[j]) :], text
                logprobs = None
                if params.logprobs is not None:
                    logprobs = [fake_logprobs(token, params.logprobs, self.vocab_size)]
                if finish:
                    live.remove(j)
                out = CompletionOutput(j, delta, [token], logprobs, finish, why)
                scored = None
                if params.prompt_logprobs is not None and step == 0 and j == 0:
                    k = params.prompt_logprobs
                    scored = [None] + [
                        fake_logprobs(t, k, self.vocab_size) for t in prompt_token_ids[1:]
                    ]
                cached = min(self.cached_tokens, len(prompt_token_ids))
                yield RequestOutput(
                    request_id, prompt, prompt_token_ids, [out], not live, cached, scored
                )
            if not live:
                return

    def _text(
        self, tokens: list[int], params: SamplingParams
    ) -> tuple[str, str | None, int | str | None]:
        """The output text so far, cut before a stop string or stop token, whether it stopped,
        and the stop string or token id that stopped it (the engine's stop_reason). As the
        engine's detokenizer, it leaves out a character whose last bytes are still due."""
        if self.tokenizer is None:
            return "", None, None
        if tokens[-1] in params.stop_token_ids:
            return self.tokenizer.decode(tokens[:-1]).rstrip("\ufffd"), "stop", tokens[-1]
        text = self.tokenizer.decode(tokens).rstrip("\ufffd")
        for stop in params.stop:
            if stop in text:
                return text[: text.index(stop)], "stop", stop
        return text, None, None
