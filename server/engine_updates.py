"""A request's engine updates: each prompt's stream from the engine, timed by the metrics as
each update arrives, the prompts' streams merged as they come; what the engine refuses as the
server's error."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from runtime.outputs import RequestOutput
from server.fields import ProtocolError
from server.metrics import Metrics
from server.protocol import GenerateRequest, Prompt

Update = tuple[int, RequestOutput]  # (prompt index, engine update)


def engine_error(exc: Exception) -> Exception:
    if type(exc).__name__ == "EngineDeadError":
        return ProtocolError(503, "the engine is not running")
    if isinstance(exc, ValueError):  # the engine's word that the request can never fit
        return ProtocolError(400, str(exc))
    return exc


async def _prompt_updates(
    engine: Any, metrics: Metrics, request_id: str, prompt: Prompt, priority: int
) -> AsyncIterator[RequestOutput]:
    """One prompt's engine updates; closing this aborts its request. The metrics time each
    update as it reaches this event loop, not as it is pulled from here: a slow client or a
    busy handler adds nothing to TTFT, inter-token or end-to-end latency."""
    timer = metrics.start(len(prompt.token_ids), prompt.params.n, prompt.params.max_tokens)
    ids, params = list(prompt.token_ids), prompt.params
    gen = engine.generate(request_id, ids, params, prompt.text, priority, on_update=timer.observe)
    try:
        async with contextlib.aclosing(gen):
            async for out in gen:
                yield out
    finally:
        timer.end()


async def request_updates(
    engine: Any, metrics: Metrics, request_id: str, req: GenerateRequest
) -> AsyncIterator[Update]:
    """Every prompt's engine updates, merged as they come; closing this aborts them all."""
    if len(req.prompts) == 1:  # nothing to merge: no task between the engine and the reply
        updates = _prompt_updates(engine, metrics, f"{request_id}-0", req.prompts[0], req.priority)
        try:
            async with contextlib.aclosing(updates):
                async for out in updates:
                    yield 0, out
        except Exception as exc:  # as the pump path's: a 503 or 400 for what the engine said
            raise engine_error(exc) from None
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception | None]] = asyncio.Queue()

    async def pump(i: int, prompt: Prompt) -> None:
        try:
            updates = _prompt_updates(engine, metrics, f"{request_id}-{i}", prompt, req.priority)
            async with contextlib.aclosing(updates):
                async for out in updates:
                    queue.put_nowait((i, out))
        except Exception as exc:
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(req.prompts)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise engine_error(item)
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # cancelling a pump closes its engine generator: the request is aborted
        await asyncio.gather(*tasks, return_exceptions=True)
