"""AsyncEngine: the engine loop on its own thread, streaming updates to asyncio consumers."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator

from runtime.engine import Engine
from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (crashed or shut down); no request can be served."""


class AsyncEngine:
    """Thread-safe front of an Engine: `generate` yields a request's updates (deltas)."""

    def __init__(self, engine: Engine, model_name: str = "model") -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.tokenizer = engine.tokenizer
        self.default_params = dict(engine.artifact.generation_config)
        self.kv_cache_tokens = engine.runner.num_tokens
        self.max_concurrency = self.kv_cache_tokens / engine.max_model_len
        self.scheduling_policy = engine.scheduler.config.policy
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._error is None and not self._stopping.is_set()

    def stats(self) -> dict:
        return self.engine.stats()

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Updates of one request until it finishes; closing the iterator aborts it.
        `priority` orders it under the "priority" policy (lower first)."""
        if request_id in self._streams:  # before anything touches the request that has it
            raise ValueError(f"request id {request_id!r} is already in use")
        stream: asyncio.Queue = asyncio.Queue()
        # registered, then checked: a loop that stops or dies from here on tells this stream
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        if not self.is_alive:
            del self._streams[request_id]
            raise EngineDeadError("the engine is not running")
        finished = False
        try:
            if params.structured_outputs is not None:  # here, not in the engine thread's steps
                await asyncio.to_thread(self.engine.compile_grammar, params.structured_outputs)
            self._commands.put(("add", request_id, prompt_token_ids, params, prompt, priority))
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if finished:
                self._streams.pop(request_id, None)
            else:  # the id stays taken until the engine thread has aborted the request
                self._commands.put(("abort", request_id, stream))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    async def shutdown(self, timeout: float) -> None:
        """Let in-flight requests finish for up to `timeout` s, abort the rest, stop the loop."""
        deadline = time.monotonic() + timeout
        # every request begun, one still compiling its grammar too
        while self._streams and time.monotonic() < deadline and self._error is None:
            await asyncio.sleep(0.05)
        self._commands.put(("stop",))
        await asyncio.to_thread(self._thread.join, 10)

    def _deliver(self, request_id: str, item) -> None:
        self._deliver_all([(request_id, item)])

    def _deliver_all(self, items: list[tuple[str, object]]) -> None:
        """Each item to its request's stream: one wake-up of each consumer loop for all of
        them (a step's updates for hundreds of streams would otherwise be as many)."""
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                loop, stream = target
                batches.setdefault(loop, []).append((stream, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _loop(self) -> None:
        try:
            while self._run_commands(block=not self.engine.has_unfinished()):
                self._deliver_all([(u.request_id, u) for u in self.engine.step()])
        except BaseException as e:  # the loop must report any death to every waiter
            log.exception("engine loop died")
            self._error = e
        finally:
            self._stopping.set()
            self._abort_all()
            self.engine.close()

    def _run_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts; False once asked to stop."""
        while True:
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "abort":
                _, request_id, closed = cmd  # closed: the stream of a consumer that left
                final = self.engine.abort(request_id)
                if closed is None:
                    if final is not None:
                        self._deliver(request_id, final)
                elif self._streams.get(request_id, (None, None))[1] is closed:
                    del self._streams[request_id]
                continue
            _, request_id, ids, params, prompt, priority = cmd
            try:
                self.engine.add_request(request_id, ids, params, prompt, priority)
            except Exception as e:  # this request's error, not the engine's
                self._deliver(request_id, e)

    def _abort_all(self) -> None:
        """In-flight requests end: with finish_reason "abort" on a shutdown, with
        EngineDeadError (a 503, not a normal-looking empty completion) when the loop died."""
        crashed = self._error is not None
        finals = [(r, self.engine.abort(r)) for r in list(self.engine.requests)]
        dead = EngineDeadError("the engine died" if crashed else "the engine stopped")
        self._deliver_all(
            [(r, final) for r, final in finals if final is not None and not crashed]
            + [(r, dead) for r in list(self._streams)]
        )


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)
