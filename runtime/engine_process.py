"""ProcessCore: the engine loop in a process of its own.

The server's process parses requests, streams tokens and keeps the metrics; the engine's
process schedules, launches and samples. Apart, neither waits on the other's GIL. Two pipes
join them: commands one way (add, abort, compile, stop), and the other way each step's
updates in one message, with the engine's stats. An update crosses as a tuple, without its
prompt, which this side keeps from the request's add: a step of 256 one-token updates with
200-token prompts encodes and pickles in ~0.2 ms and 17 KB so, against ~1.8 ms and 165 KB
as dataclasses.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.async_engine import EngineDeadError, EngineLoop, Sink, Stopped
from runtime.config import EngineConfig
from runtime.logs import configure_logging
from runtime.outputs import CompletionOutput, RequestOutput, RequestTimes
from runtime.sampling_params import StructuredOutputs

if TYPE_CHECKING:
    from runtime.engine import Engine

log = logging.getLogger(__name__)

EXIT_GRACE_S = 5.0  # how long a server that exits without a shutdown waits for the engine


def load_engine(path: Path, config: EngineConfig) -> Engine:
    """The engine of the artifact at `path`: ProcessCore's `make_engine` for `kiln run`."""
    from runtime.engine import Engine

    return Engine.load(path, config)


class ProcessCore:
    """Starts `make_engine()` (picklable) in a spawned process at once; `start` waits until
    the engine is ready, raising what its construction raised, then runs its loop there."""

    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state, no threads
        commands, self._commands = ctx.Pipe(duplex=False)
        self._updates, updates = ctx.Pipe(duplex=False)
        level = logging.getLogger().getEffectiveLevel()
        # daemon: multiprocessing ends it at exit, after `_exit`, which lets it stop first
        self._process = ctx.Process(
            target=_main,
            args=(make_engine, commands, updates, level),
            name="kiln-engine",
            daemon=True,
        )
        self._process.start()
        self.pid = self._process.pid
        commands.close()  # the child's ends: its exit then reads as EOF here
        updates.close()
        atexit.register(self._exit)
        self._send_lock = threading.Lock()
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._closed = False  # the pipe from the process has ended
        self._prompts: dict[str, tuple[str | None, list[int]]] = {}  # request id -> prompt
        self._reader: threading.Thread | None = None

    def start(self, sink: Sink) -> None:
        try:
            kind, info = self._next()
        except EOFError:
            self._process.join()
            raise RuntimeError(
                f"the engine process exited while starting (exit code {self._process.exitcode})"
            ) from None
        except BaseException:  # a Ctrl-C while the model loads
            self._process.kill()
            raise
        if kind == "error":
            self._exit()
            raise info
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self.tokenizer = info["tokenizer"]
        self.generation_config = info["generation_config"]
        self.kv_cache_tokens = info["kv_cache_tokens"]
        self.scheduling_policy = info["scheduling_policy"]
        self._stats = info["stats"]
        self._reader = threading.Thread(
            target=self._read, args=(sink,), name="kiln-engine-reader", daemon=True
        )
        self._reader.start()

    def put(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt_token_ids, _, prompt, _ = command
            self._prompts[request_id] = (prompt, prompt_token_ids)
        # OSError: the process is gone, and the reader reports that to every stream
        with self._send_lock, contextlib.suppress(OSError):
            self._commands.send(command)

    def alive(self) -> bool:
        return self._reader.is_alive()

    def stats(self) -> dict:
        return self._stats

    @property
    def exitcode(self) -> int | None:
        """The process's exit status once it has exited (negative: killed by that signal)."""
        return self._process.exitcode

    async def compile_grammar(self, spec: StructuredOutputs) -> None:
        """Compiled in the engine's process, off its loop; ValueError if it does not."""
        call = next(self._call_ids)
        future = self._calls[call] = Future()
        if self._closed:  # the reader's last sweep of the calls may have missed this one
            del self._calls[call]
            raise EngineDeadError("the engine is not running")
        self.put(("compile", call, spec))
        # a client that leaves cancels `future`; the reply then finds it done
        error = await asyncio.wrap_future(future)
        if error is not None:
            raise error

    def join(self, timeout: float) -> None:
        atexit.unregister(self._exit)
        self._process.join(timeout)
        if self._process.is_alive():  # it ignores SIGTERM: that is the server's to act on
            log.warning("the engine process did not stop in %.0f s; killing it", timeout)
            self._process.kill()
            self._process.join()
        self._reader.join()
        self._commands.close()
        self._updates.close()

    def _exit(self) -> None:
        """At exit without a shutdown (a port in use, a crash): the process reads the end
        of its commands, aborts what it runs and stops; killed if it does not."""
        self._commands.close()
        try:
            self._process.join(EXIT_GRACE_S)
        finally:  # a second Ctrl-C too: multiprocessing's own exit would wait on it forever
            if self._process.is_alive():
                self._process.kill()

    def _read(self, sink: Sink) -> None:
        error = None
        try:
            while True:
                message = self._next()
                if message[0] == "reply":
                    _, call, failure = message
                    _resolve(self._calls.pop(call), failure)
                    continue
                _, items, self._stats = message
                sink([self._decode(request_id, item) for request_id, item in items])
                if items and isinstance(items[-1][1], Stopped):
                    break
        except (EOFError, OSError):  # it died without a word: killed, or out of memory
            self._process.join(EXIT_GRACE_S)
            code = self._process.exitcode
            error = EngineDeadError(f"the engine process exited (exit code {code})")
        except BaseException as e:  # a message this side cannot read: the pair is broken
            log.exception("reading the engine process's updates failed")
            self._process.kill()
            error = e
        self._closed = True
        while self._calls:
            _resolve(self._calls.popitem()[1], EngineDeadError("the engine is not running"))
        if error is not None:
            sink([(None, Stopped(error))])

    def _next(self) -> tuple:
        """The process's next message; EOFError once it has exited with none left. Its exit
        status is asked for every second: a child of the engine's that kept the pipes (and
        multiprocessing's sentinel) open would otherwise hide its death."""
        while not self._updates.poll(1.0):
            if not self._process.is_alive() and not self._updates.poll():
                raise EOFError
        return self._updates.recv()

    def _decode(self, request_id: str | None, item: Any) -> tuple[str | None, Any]:
        """An update with its prompt again; a request's last item lets its prompt go."""
        if type(item) is not tuple:  # an error, Released or Stopped
            if request_id is not None:
                self._prompts.pop(request_id, None)
            return request_id, item
        finished, num_cached_tokens, prompt_logprobs, outputs, times = item
        prompt, prompt_token_ids = self._prompts[request_id]
        if finished:
            del self._prompts[request_id]
        outs = [CompletionOutput(*output) for output in outputs]
        update = RequestOutput(request_id, prompt, prompt_token_ids, outs, finished)
        update.num_cached_tokens, update.prompt_logprobs = num_cached_tokens, prompt_logprobs
        if times is not None:
            update.times = RequestTimes(*times)
        return request_id, update


def _resolve(future: Future, failure: BaseException | None) -> None:
    with contextlib.suppress(InvalidStateError):  # cancelled: its client left
        future.set_result(failure)


def _ignore(signum, frame) -> None:
    """A handler that does nothing: unlike SIG_IGN, not inherited by the processes the
    engine starts (tensor-parallel ranks), which a signal must still stop."""


def _main(make_engine: Callable[[], Engine], commands: Connection, updates: Connection, level):
    """The engine process: build the engine, then run its loop until told to stop (or until
    the server's process is gone)."""
    # the server's process owns shutdown: a Ctrl-C or SIGTERM to the process group must not
    # kill the loop under requests that are draining
    signal.signal(signal.SIGINT, _ignore)
    signal.signal(signal.SIGTERM, _ignore)
    configure_logging(level)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        # OSError: the server's process is gone, and the receiver stops the loop
        with lock, contextlib.suppress(OSError):
            updates.send(message)

    try:
        engine = make_engine()
    except BaseException as e:
        send(("error", _error(e)))
        error = e
    else:
        send(("ready", _info(engine)))
        loop = EngineLoop(
            engine, lambda items: send(("updates", [_encode(i) for i in items], engine.stats()))
        )
        receiver = threading.Thread(target=_receive, args=(commands, loop, engine, send))
        receiver.daemon = True
        receiver.start()
        error = loop.run()
    # the process has said how it ended; exit without the interpreter's teardown, in which a
    # process that compiled a grammar aborts ("terminate called without an active exception")
    logging.shutdown()
    os._exit(0 if error is None else 1)


def _receive(commands: Connection, loop: EngineLoop, engine: Engine, send) -> None:
    """Feeds the loop its commands; structured outputs compile on a pool, off the loop."""
    with ThreadPoolExecutor(2, thread_name_prefix="kiln-grammar") as pool:
        try:
            while (command := commands.recv())[0] != "stop":
                if command[0] == "compile":
                    pool.submit(_compile, engine, send, *command[1:])
                else:
                    loop.commands.put(command)
        except (EOFError, OSError):  # the server's process is gone
            pass
        except BaseException:
            log.exception("reading the server's commands failed")
        loop.commands.put(("stop",))


def _compile(engine: Engine, send, call: int, spec: StructuredOutputs) -> None:
    try:
        engine.compile_grammar(spec)
        error = None
    except Exception as e:
        error = _error(e)
    send(("reply", call, error))


def _info(engine: Engine) -> dict[str, Any]:
    return {
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.vocab_size,
        "tokenizer": engine.tokenizer,
        "generation_config": dict(engine.artifact.generation_config),
        "kv_cache_tokens": engine.runner.num_tokens,
        "scheduling_policy": engine.scheduler.config.policy,
        "stats": engine.stats(),
    }


def _encode(pair: tuple[str | None, Any]) -> tuple[str | None, Any]:
    """An item as it crosses the pipe: an update as a tuple without its prompt; exceptions
    that do not unpickle as themselves as RuntimeErrors that name them."""
    request_id, item = pair
    if type(item) is RequestOutput:
        outputs = [
            (o.index, o.text, o.token_ids, o.logprobs, o.finish_reason, o.stop_reason)
            for o in item.outputs
        ]
        t = item.times  # in a request's last update only
        times = None if t is None else (t.queue, t.prefill, t.decode)
        update = (item.finished, item.num_cached_tokens, item.prompt_logprobs, outputs, times)
        return request_id, update
    if isinstance(item, BaseException):
        return request_id, _error(item)
    if isinstance(item, Stopped) and item.error is not None:
        return request_id, Stopped(_error(item.error))
    return pair


def _error(e: BaseException) -> BaseException:
    try:
        if type(pickle.loads(pickle.dumps(e))) is type(e):
            return e
    except Exception:
        pass
    return RuntimeError(f"{type(e).__name__}: {e}")
