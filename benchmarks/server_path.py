"""The serving path's own cost, without a model: an engine stand-in that runs as the GPU engine
does with asynchronous scheduling. Each step holds the GIL --host-ms (scheduling, launching),
queues --gpu-ms of "GPU" work behind the step before, then waits with the GIL free for that
step before's work to end and gives every running request one token. --streams requests of
--tokens tokens stream through AsyncEngine and the server's app to benchmarks/serving's
client, in another process. The ideal is --streams tokens every max(gpu-ms, host-ms); the
server's event loop, where it shares the GIL with the engine's loop, shows as the distance to
it. --engine thread process: the loop on a thread of the server's process (ThreadCore), in a
process of its own (ProcessCore), or each in turn.

    python -m benchmarks.server_path --streams 64 256 --tokens 200 --gpu-ms 8 --host-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import statistics
import time
import types
from concurrent.futures import ProcessPoolExecutor

from aiohttp import web

from benchmarks.common import save, table
from benchmarks.serving import Request, run_kiln
from runtime.async_engine import AsyncEngine, ThreadCore
from runtime.engine_process import ProcessCore
from runtime.outputs import CompletionOutput, RequestOutput
from runtime.stats import ITERATION_TOKENS_BUCKETS
from server import ServerConfig, create_app


class StandInEngine:
    """What AsyncEngine and the server use of an Engine; a step's "GPU" work is a deadline,
    each queued behind the one before, and its tokens land a step later."""

    max_model_len, vocab_size, tokenizer = 4096, 1000, None
    artifact = types.SimpleNamespace(generation_config={})
    runner = types.SimpleNamespace(num_tokens=1 << 20)
    scheduler = types.SimpleNamespace(config=types.SimpleNamespace(policy="fcfs"))

    def __init__(self, gpu_s: float, host_s: float) -> None:
        self.gpu_s, self.host_s = gpu_s, host_s
        self.requests: dict[str, list] = {}  # id -> [prompt, params, tokens made]
        self.gpu_done = 0.0  # when the work queued so far ends
        self.steps = 0

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def add_request(self, request_id, prompt_token_ids, params, prompt=None, priority=0) -> None:
        self.requests[request_id] = [prompt_token_ids, params, 0]

    def abort(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def close(self) -> None:
        pass

    def stats(self) -> dict:
        return {
            "num_running": len(self.requests),
            "num_waiting": 0,
            "kv_cache_usage": 0.0,
            "prefix_cache_queries": 0,
            "prefix_cache_hits": 0,
            "num_preemptions": 0,
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "computed_tokens": 0,  # nothing ran, as far as the stats line and /metrics know
            "iteration_tokens": (0,) * (len(ITERATION_TOKENS_BUCKETS) + 1),
        }

    def step(self) -> list[RequestOutput]:
        busy_until = time.perf_counter() + self.host_s
        while time.perf_counter() < busy_until:  # scheduling and launching: the GIL held
            pass
        before, self.gpu_done = self.gpu_done, max(time.perf_counter(), self.gpu_done) + self.gpu_s
        time.sleep(max(0.0, before - time.perf_counter()))  # the step before's tokens
        self.steps += 1
        outs = []
        for request_id, request in list(self.requests.items()):
            prompt, params, made = request
            request[2] = made = made + 1
            done = made >= params.max_tokens
            token = CompletionOutput(0, "", [made % self.vocab_size], None, "length" * done or None)
            outs.append(RequestOutput(request_id, None, prompt, [token], done))
            if done:
                del self.requests[request_id]
        return outs


def client(url: str, streams: int, tokens: int) -> tuple[float, float]:
    """(tok/s, median TPOT in s) of `streams` requests sent at once."""
    records, seconds = asyncio.run(
        run_kiln(url, [Request([1, 2, 3], tokens)] * streams, [0.0] * streams)
    )
    return streams * tokens / seconds, statistics.median(r.tpot for r in records)


async def measure(args) -> dict:
    make_engine = functools.partial(StandInEngine, args.gpu_ms / 1e3, args.host_ms / 1e3)
    core = ThreadCore(make_engine()) if args.engine == "thread" else ProcessCore(make_engine)
    front = AsyncEngine(core)
    runner = web.AppRunner(create_app(front, ServerConfig()))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        with ProcessPoolExecutor(1) as pool:
            loop = asyncio.get_running_loop()
            rate, tpot = await loop.run_in_executor(pool, client, url, args.streams, args.tokens)
    finally:
        await front.shutdown(1.0)
        await runner.cleanup()
    ideal_s = max(args.gpu_ms, args.host_ms) / 1e3
    return {
        "engine": args.engine,
        "streams": args.streams,
        "tok_s": round(rate),
        "ideal_tok_s": round(args.streams / ideal_s),
        "tpot_p50_ms": round(tpot * 1e3, 2),
        "ideal_tpot_ms": max(args.gpu_ms, args.host_ms),
        "us_per_token": round((tpot - ideal_s) / args.streams * 1e6, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--streams", type=int, nargs="+", default=[64, 256])
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--gpu-ms", type=float, default=8.0)
    p.add_argument("--host-ms", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine", nargs="+", choices=("thread", "process"), default=["process"])
    args = p.parse_args()
    if args.tokens < 2:
        p.error("--tokens must be at least 2: TPOT is the time between tokens")
    rows = []
    for engine, streams in itertools.product(args.engine, args.streams):
        case = argparse.Namespace(**{**vars(args), "engine": engine, "streams": streams})
        runs = [asyncio.run(measure(case)) for _ in range(args.repeats)]
        rows.append(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2])  # the median run
    print(table(rows, list(rows[0])))
    print(f"wrote {save('server-path', {'workload': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
