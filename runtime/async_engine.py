"""AsyncEngine: an engine loop streaming updates to asyncio consumers.

The loop (EngineLoop) runs where its core puts it: on a thread of this process (ThreadCore),
or in a process of its own (runtime.engine_process.ProcessCore), which keeps the server's
per-token work off the engine's GIL. Either way it hands each step's updates to the front
(AsyncEngine) in one batch, and the front routes them to the requests' streams. A stream's
`on_update` callback sees each update as it reaches the consumer's event loop, however late
the consumer pulls it (the server's latency metrics are taken there).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from runtime.outputs import RequestOutput
from runtime.sampling_params import SamplingParams, StructuredOutputs
from runtime.stats import StatsLogger

if TYPE_CHECKING:  # a server whose engine runs in another process need not import torch
    from runtime.engine import Engine

log = logging.getLogger(__name__)

# (request id, item) pairs: a RequestOutput, a request's exception, Released or Stopped
Sink = Callable[[list[tuple[str | None, Any]]], None]


class EngineDeadError(RuntimeError):
    """The engine loop stopped (crashed or shut down); no request can be served."""


@dataclass(frozen=True, slots=True)
class Released:
    """The request of a stream whose consumer left is aborted: its id is free again."""


@dataclass(frozen=True, slots=True)
class Stopped:
    """The loop ended: `error` is what killed it, None on a shutdown."""

    error: BaseException | None


@dataclass(slots=True)
class _Stream:
    """A request's stream on its consumer's event loop: the queue its items go to, and the
    callback that sees each update as it is queued (None once the consumer has left)."""

    loop: asyncio.AbstractEventLoop
    on_update: Callable[[RequestOutput], None] | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class EngineLoop:
    """Runs an Engine: applies queued commands (add, abort, stop) between steps, hands each
    step's updates to `sink` in one call, and logs the engine's stats line while it works."""

    def __init__(self, engine: Engine, sink: Sink) -> None:
        self.engine = engine
        self.sink = sink
        self.commands: queue.SimpleQueue = queue.SimpleQueue()

    def run(self) -> BaseException | None:
        """Until told to stop; what killed the loop, if something did."""
        error = None
        try:
            stats_log = StatsLogger(self.engine.stats, time.monotonic())
            while self._run_commands(block=not self.engine.has_unfinished()):
                self.sink([(u.request_id, u) for u in self.engine.step()])
                stats_log.tick(time.monotonic())  # an idle loop comes by every 0.5 s
        except BaseException as e:  # the loop must report any death to every waiter
            log.exception("engine loop died")
            error = e
        finally:
            # in-flight requests end with finish_reason "abort" on a shutdown; after a
            # crash their streams get EngineDeadError from the front instead
            finals = [(r, self.engine.abort(r)) for r in list(self.engine.requests)]
            done = [(r, f) for r, f in finals if f is not None and error is None]
            self.sink([*done, (None, Stopped(error))])
            self.engine.close()
        return error

    def _run_commands(self, block: bool) -> bool:
        """Apply queued adds/aborts; False once asked to stop."""
        while True:
            try:
                cmd = self.commands.get(timeout=0.5) if block else self.commands.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd[0] == "stop":
                return False
            if cmd[0] == "abort":
                _, request_id, released = cmd  # released: its consumer left, free the id
                final = self.engine.abort(request_id)
                if released:
                    self.sink([(request_id, Released())])
                elif final is not None:
                    self.sink([(request_id, final)])
                continue
            _, request_id, ids, params, prompt, priority = cmd
            try:
                self.engine.add_request(request_id, ids, params, prompt, priority)
            except Exception as e:  # this request's error, not the engine's
                self.sink([(request_id, e)])


class Core(Protocol):
    """Where the loop runs, and what the front needs to know of its engine (known once
    `start` has returned)."""

    max_model_len: int
    vocab_size: int
    tokenizer: Any
    generation_config: dict
    kv_cache_tokens: int
    scheduling_policy: str

    def start(self, sink: Sink) -> None: ...
    def put(self, command: tuple) -> None: ...
    def alive(self) -> bool: ...
    def stats(self) -> dict: ...
    async def compile_grammar(self, spec: StructuredOutputs) -> None: ...
    def join(self, timeout: float) -> None: ...


class ThreadCore:
    """The loop on a thread of this process, around an Engine built here."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.vocab_size
        self.tokenizer = engine.tokenizer
        self.generation_config = dict(engine.artifact.generation_config)
        self.kv_cache_tokens = engine.runner.num_tokens
        self.scheduling_policy = engine.scheduler.config.policy
        self._loop: EngineLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, sink: Sink) -> None:
        self._loop = EngineLoop(self.engine, sink)
        self._thread = threading.Thread(target=self._loop.run, name="kiln-engine", daemon=True)
        self._thread.start()

    def put(self, command: tuple) -> None:
        self._loop.commands.put(command)

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        return self.engine.stats()

    async def compile_grammar(self, spec: StructuredOutputs) -> None:
        # off the engine's thread, whose steps a long compile would hold up
        await asyncio.to_thread(self.engine.compile_grammar, spec)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class AsyncEngine:
    """Thread-safe front of an engine loop: `generate` yields a request's updates (deltas).
    `core` runs the loop: `ThreadCore(engine)` on a thread, or a ProcessCore."""

    def __init__(self, core: Core, model_name: str = "model") -> None:
        self.core = core
        self.model_name = model_name
        self._streams: dict[str, _Stream] = {}
        self._error: BaseException | None = None
        self._stopped = False
        self.core.start(self._deliver_all)
        self.max_model_len = self.core.max_model_len
        self.vocab_size = self.core.vocab_size
        self.tokenizer = self.core.tokenizer
        self.default_params = dict(self.core.generation_config)
        self.kv_cache_tokens = self.core.kv_cache_tokens
        self.max_concurrency = self.kv_cache_tokens / self.max_model_len
        self.scheduling_policy = self.core.scheduling_policy

    @property
    def is_alive(self) -> bool:
        return not self._stopped and self.core.alive()

    def stats(self) -> dict:
        """The engine's figures; once it has stopped, nothing runs, waits or holds the cache
        (the counters keep their totals)."""
        stats = self.core.stats()
        if not self.is_alive:
            stats = {**stats, "num_running": 0, "num_waiting": 0, "kv_cache_usage": 0.0}
        return stats

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        priority: int = 0,
        on_update: Callable[[RequestOutput], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Updates of one request until it finishes; closing the iterator aborts it.
        `priority` orders it under the "priority" policy (lower first). `on_update` is called
        on this event loop with each update as it arrives, before it is queued for this
        iterator (so however late the consumer pulls it), until the iterator is closed; what
        it raises is logged, not passed on."""
        if request_id in self._streams:  # before anything touches the request that has it
            raise ValueError(f"request id {request_id!r} is already in use")
        stream = _Stream(asyncio.get_running_loop(), on_update)
        # registered, then checked: a loop that stops or dies from here on tells this stream
        self._streams[request_id] = stream
        if not self.is_alive:
            del self._streams[request_id]
            raise EngineDeadError("the engine is not running")
        finished = False
        try:
            if params.structured_outputs is not None:
                await self.core.compile_grammar(params.structured_outputs)
            self.core.put(("add", request_id, prompt_token_ids, params, prompt, priority))
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            stream.on_update = None  # what comes after the consumer left is not its update
            if finished:
                self._streams.pop(request_id, None)
            else:  # the id stays taken until the loop has aborted the request
                self.core.put(("abort", request_id, True))

    def abort(self, request_id: str) -> None:
        self.core.put(("abort", request_id, False))

    async def shutdown(self, timeout: float) -> None:
        """Let in-flight requests finish for up to `timeout` s, abort the rest, stop the loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # every request begun, one still compiling its grammar too
        while self._streams and loop.time() < deadline and self._error is None:
            await asyncio.sleep(0.05)
        self.core.put(("stop",))
        await asyncio.to_thread(self.core.join, 10)

    def _deliver_all(self, items: list[tuple[str | None, Any]]) -> None:
        """Each item to its request's stream: one wake-up of each consumer loop for all of
        them (a step's updates for hundreds of streams would otherwise be as many)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, Any]]] = {}
        for request_id, item in items:
            if isinstance(item, Released):
                self._streams.pop(request_id, None)
                continue
            if isinstance(item, Stopped):
                self._stop(item.error, batches)
                continue
            stream = self._streams.get(request_id)
            if stream is not None:
                batches.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(_put_all, batch)

    def _stop(self, error: BaseException | None, batches: dict) -> None:
        """Every stream still open gets EngineDeadError (a 503, not a normal-looking empty
        completion); the ones finished by the shutdown got their finals first."""
        self._error = error
        self._stopped = True  # first: a stream registered from here on sees it
        dead = EngineDeadError(
            "the engine stopped" if error is None else f"the engine died: {error!r}"
        )
        for stream in list(self._streams.values()):
            batches.setdefault(stream.loop, []).append((stream, dead))


def _put_all(batch: list[tuple[_Stream, Any]]) -> None:
    """On the consumer's loop: each item into its stream, its update's callback first."""
    for stream, item in batch:
        if stream.on_update is not None and isinstance(item, RequestOutput):
            try:
                stream.on_update(item)
            except Exception:  # a broken observer must not cost the stream its updates
                log.exception("on_update of a stream failed")
        stream.queue.put_nowait(item)
