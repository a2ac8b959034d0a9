"""The server's life: listen, serve until SIGTERM/SIGINT (or the engine dies), then drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from aiohttp import web

from server.app import STATE

logger = logging.getLogger(__name__)
ENGINE_POLL_S = 0.5  # how often serve() checks that the engine loop is alive
DEAD_ENGINE_GRACE_S = 2.0  # /health says 503 this long before a dead engine's server exits
ACCEPT_SETTLE_S = 0.05  # loop time for the last accepted connections to register at shutdown


async def serve(
    app: web.Application, host: str, port: int, shutdown_timeout: float, engine: Any
) -> bool:
    """Serve until SIGTERM/SIGINT, then drain: refuse new work, let the engine finish, close.

    Returns False when the engine died instead: /health answered 503 for a grace period,
    then the server stopped (the CLI exits non-zero, for a supervisor to restart it).
    """
    # handler_cancellation: a client that disconnects cancels its handler, which aborts its
    # request; the short shutdown_timeout applies after the engine has drained
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5.0)
    await runner.setup()
    loop = asyncio.get_running_loop()
    listener = None
    try:
        listener = await loop.create_server(runner.server, host, port)
        logger.info("ready: http://%s:%d (OpenAI API under /v1)", host, port)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            while not stop.is_set() and engine.is_alive:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ENGINE_POLL_S)
            if not stop.is_set():
                logger.error("the engine died; stopping in %.0f s", DEAD_ENGINE_GRACE_S)
                await asyncio.sleep(DEAD_ENGINE_GRACE_S)
                return False
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        logger.info("shutting down: in-flight requests get up to %.1f s", shutdown_timeout)
        app[STATE].draining = True
        await engine.shutdown(shutdown_timeout)
        return True
    finally:
        if listener is not None:
            await stop_listening(listener)
        await runner.cleanup()


async def stop_listening(listener: asyncio.Server) -> None:
    """Close the listener without stranding a connection accepted as it closes.

    asyncio sets an accepted socket up one loop turn after accepting it and, if the listener
    was closed in between, drops it unread and open (CPython gh-109564), so its client waits
    for its own timeout. So: stop accepting, let what was accepted register with the server,
    then close the sockets (refusing whatever the kernel still queues)."""
    loop = asyncio.get_running_loop()
    for sock in listener.sockets:
        loop.remove_reader(sock.fileno())
    await asyncio.sleep(ACCEPT_SETTLE_S)
    listener.close()
