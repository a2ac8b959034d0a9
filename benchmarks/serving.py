"""W4, online serving: requests arrive as a Poisson process at each --rates (requests/s) and
stream from `kiln run` through /v1/completions; TTFT, TPOT, ITL (p50/p99) and goodput.

Input and output lengths are log-normal (sigma 1, ShareGPT-like: means ~200 in / ~180 out),
prompts are random token ids and every output runs to its drawn length (`ignore_eos`); each
rate gets the same lengths, with prompts of its own (no run finds another's in a prefix
cache). Tokens are counted as they arrive through vLLM's
`return_token_ids`, so a token-id-only artifact, which streams no text, is timed as well.
The peer, transformers' continuous batching (its ContinuousBatchingManager, in process: no
HTTP), gets the first --peer-requests of them at the same times; kiln runs that many too,
so that the two compare on the same work.

    python -m benchmarks.serving --target cuda      # Qwen3-0.6B shape (or --model), one GPU
    python -m benchmarks.serving --artifact artifacts/smollm2-cpu --source builtin:smollm2 \\
        --rates 0.5 1 --requests 16 --mean-input 64 --mean-output 32     # the CPU
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import math
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import torch

from benchmarks.common import cpu_seconds, save, start_kiln, table

COPY_BANDWIDTH = 4.25e12  # bytes/s, the H200's device-to-device copy (BENCH.md)
PEER_TIMEOUT_S = 300.0  # transformers silent this long: its manager is stuck


@dataclass(frozen=True, slots=True)
class Request:
    prompt: list[int]
    output_len: int


@dataclass(slots=True)
class Record:
    """One request's timeline: when it was sent, and when each chunk of its tokens came."""

    sent: float = 0.0
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # tokens in each chunk

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.times[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; None for a one-token output."""
        return (self.e2e - self.ttft) / (self.tokens - 1) if self.tokens > 1 else None

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies: the time between successive chunks."""
        return [b - a for a, b in itertools.pairwise(self.times)]

    def arrived(self, count: int) -> None:
        if count:
            self.times.append(time.perf_counter())
            self.counts.append(count)


def lengths(rng: random.Random, n: int, mean: float, lo: int, hi: int) -> list[int]:
    """Log-normal lengths (sigma 1) of the given mean before clipping to [lo, hi]."""
    mu = math.log(mean) - 0.5
    return [min(hi, max(lo, round(rng.lognormvariate(mu, 1.0)))) for _ in range(n)]


def requests(
    n: int, vocab: int, mean_in: float, mean_out: float, max_len: int, seed: int = 0, run: int = 0
) -> list[Request]:
    """n requests whose prompt and output together fit in max_len tokens. Every `run` has the
    same lengths and prompts of its own, so that no run finds another's in a prefix cache."""
    rng = random.Random(seed)
    ins = lengths(rng, n, mean_in, 4, max_len // 2)
    outs = lengths(rng, n, mean_out, 4, max_len // 2)
    tokens = random.Random(f"{seed}/{run}")
    return [
        Request([tokens.randrange(vocab) for _ in range(i)], o)
        for i, o in zip(ins, outs, strict=True)
    ]


def arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Send times in seconds from the start: a Poisson process at `rate` (inf: all at once)."""
    rng = random.Random(f"{seed}-{rate}")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    return times


def summarize(system: str, rate: float, records: list[Record], seconds: float, slo) -> dict:
    """The row of one run; `slo` = (ttft, tpot) in seconds: goodput counts the requests
    within both."""
    ms = lambda xs, q: round(float(np.percentile(xs, q)) * 1e3, 2) if xs else None  # noqa: E731
    ttft = [r.ttft for r in records]
    tpot = [r.tpot for r in records if r.tpot is not None]
    itl = [g for r in records for g in r.gaps]
    good = sum(r.ttft <= slo[0] and (r.tpot or 0.0) <= slo[1] for r in records)
    return {
        "system": system,
        "rate": rate,
        "requests": len(records),
        "seconds": round(seconds, 2),
        "req_s": round(len(records) / seconds, 2),
        "out_tok_s": round(sum(r.tokens for r in records) / seconds, 1),
        "ttft_p50_ms": ms(ttft, 50),
        "ttft_p99_ms": ms(ttft, 99),
        "tpot_p50_ms": ms(tpot, 50),
        "tpot_p99_ms": ms(tpot, 99),
        "itl_p50_ms": ms(itl, 50),
        "itl_p99_ms": ms(itl, 99),
        "goodput_req_s": round(good / seconds, 2),
    }


COLUMNS = [
    "system",
    "rate",
    "requests",
    "req_s",
    "out_tok_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "tpot_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "goodput_req_s",
    "client_cpu",
    "server_cpu",
]


# --- kiln: a streaming client ---------------------------------------------------


async def stream_one(session: aiohttp.ClientSession, url: str, req: Request, at: float) -> Record:
    """Send `req` at perf_counter time `at` and time its streamed tokens."""
    await asyncio.sleep(max(0.0, at - time.perf_counter()))
    body = {
        "prompt": req.prompt,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
    }
    record = Record(time.perf_counter())
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue  # blank separators and [DONE]
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            record.arrived(sum(len(c.get("token_ids") or ()) for c in chunk["choices"]))
    if record.tokens != req.output_len:
        raise RuntimeError(f"{record.tokens} tokens streamed, {req.output_len} asked for")
    return record


async def run_kiln(url: str, reqs: list[Request], times: list[float]):
    """All of `reqs`, request i sent times[i] seconds after the start: (records, seconds)."""
    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests in flight
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        jobs = [stream_one(session, url, r, start + t) for r, t in zip(reqs, times, strict=True)]
        records = await asyncio.gather(*jobs)
        return list(records), time.perf_counter() - start


# --- the peer: transformers' continuous batching ----------------------------------------------


class HFPeer:
    """transformers' ContinuousBatchingManager, fed requests at their arrival times from a
    thread while this one reads its streamed outputs."""

    def __init__(self, model, max_new_tokens: int) -> None:
        from transformers import GenerationConfig

        config = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
        )
        self.manager = model.init_continuous_batching(generation_config=config)
        self.manager.start()
        self.runs = 0

    def run(self, reqs: list[Request], times: list[float]) -> tuple[list[Record], float]:
        self.runs += 1
        ids = [f"run{self.runs}-{i}" for i in range(len(reqs))]
        records = {rid: Record() for rid in ids}
        start = time.perf_counter()

        def submit() -> None:
            for rid, req, t in zip(ids, reqs, times, strict=True):
                time.sleep(max(0.0, start + t - time.perf_counter()))
                records[rid].sent = time.perf_counter()
                self.manager.add_request(
                    input_ids=req.prompt,
                    request_id=rid,
                    max_new_tokens=req.output_len,
                    streaming=True,
                )

        sender = threading.Thread(target=submit, daemon=True)
        sender.start()
        done, silent = 0, time.perf_counter()
        while done < len(reqs):
            out = self.manager.get_result(timeout=0.5)
            if out is None:
                if time.perf_counter() - silent > PEER_TIMEOUT_S:
                    raise TimeoutError(f"transformers gave nothing for {PEER_TIMEOUT_S} s")
                continue
            silent, record = time.perf_counter(), records[out.request_id]
            record.arrived(len(out.generated_tokens) - record.tokens)
            done += out.is_finished()
        seconds = time.perf_counter() - start
        sender.join()
        return [records[rid] for rid in ids], seconds

    def stop(self) -> None:
        self.manager.stop(block=True)


# --- main ---------------------------------------------------------------------------------------


def build_cuda(args) -> tuple[Path, object]:
    """A random-weight model of args.model compiled for the GPU: (artifact, the model)."""
    from benchmarks.models import random_model, save_source

    model = random_model(args.model)
    source = save_source(model, args.workdir / "hf")
    artifact = args.workdir / "artifact"
    compile_cmd = [sys.executable, "-m", "kiln.cli", "compile", source, "-o", str(artifact)]
    compile_cmd += ["--target", "cuda", "--max-model-len", str(args.max_len)]
    subprocess.run(compile_cmd, check=True)
    return artifact, model


def peer_model(args):
    """transformers' model for the peer: the GPU model, or --source in float32 on the CPU."""
    from compiler.frontend.loader import load_model

    model = load_model(args.source, torch.float32).model
    model.config._attn_implementation = "sdpa"
    return model


def peer_rows(model, workload, args, slo) -> list[dict]:
    """transformers at every rate, on the first args.peer_requests requests."""
    warm_up, n = workload(0)[:4], args.peer_requests
    peer, rows = HFPeer(model, max(r.output_len for r in workload(0))), []
    try:
        peer.run(warm_up, [0.0] * len(warm_up))
        for k, rate in enumerate(args.rates, 1):
            records, seconds = peer.run(workload(k)[:n], arrivals(n, rate, args.seed))
            rows.append(summarize(f"hf continuous batching, {n}", rate, records, seconds, slo))
            print(table(rows[-1:], COLUMNS), flush=True)
    finally:
        peer.stop()
    return rows


def kiln_rows(url: str, server_pid: int, workload, args, slo) -> list[dict]:
    """kiln at every rate on all the requests, then on as many as the peer runs; with the
    share of a core the client (this process) and the server's process (HTTP, JSON, SSE; the
    engine has a process of its own) were busy: one near 1 is what bounds the run."""
    warm_up, rows = workload(0)[:8], []
    asyncio.run(run_kiln(url, warm_up, [0.0] * len(warm_up)))
    sizes = [args.requests] + ([args.peer_requests] if args.peer_requests else [])
    for i, n in enumerate(sizes):
        for k, rate in enumerate(args.rates, 1):
            run = k + i * len(args.rates)  # fresh prompts: nothing cached from an earlier run
            client, server = cpu_seconds(), cpu_seconds(server_pid)
            records, seconds = asyncio.run(
                run_kiln(url, workload(run)[:n], arrivals(n, rate, args.seed))
            )
            row = summarize(f"kiln, {n}", rate, records, seconds, slo)
            row["client_cpu"] = round((cpu_seconds() - client) / seconds, 2)
            row["server_cpu"] = round((cpu_seconds(server_pid) - server) / seconds, 2)
            rows.append(row)
            print(table(rows[-1:], COLUMNS), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="qwen3-0.6b", help="cuda: the random-weight shape")
    p.add_argument("--artifact", type=Path, help="cpu: the artifact to serve")
    p.add_argument("--source", help="cpu: the model the transformers peer loads")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 16.0, 64.0, 128.0])
    p.add_argument(
        "--requests",
        type=int,
        default=256,
        help="per rate; above saturation a run this short ends on its longest request's decode "
        "(1024 measure the H200's steady state)",
    )
    p.add_argument("--peer-requests", type=int, default=32, help="per rate; 0: no peer")
    p.add_argument("--mean-input", type=float, default=200.0)
    p.add_argument("--mean-output", type=float, default=180.0)
    p.add_argument("--max-len", type=int, default=2048, help="prompt + output at most")
    p.add_argument("--slo-ttft-ms", type=float, default=500.0)
    p.add_argument("--slo-tpot-ms", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-serving"))
    p.add_argument("--server-args", default="", help="more `kiln run` flags, one string")
    args = p.parse_args()
    if args.target == "cpu" and args.artifact is None:
        p.error("--target cpu needs --artifact")
    if args.target == "cpu" and args.peer_requests and args.source is None:
        p.error("--target cpu needs --source for the peer (or --peer-requests 0)")
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)

    model = None
    if args.target == "cuda":
        artifact, model = build_cuda(args)
        vocab = model.config.vocab_size
        weight_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
    else:
        artifact = args.artifact
        manifest = json.loads((artifact / "manifest.json").read_text())
        if args.max_len > manifest["max_model_len"]:
            p.error(f"--max-len is more than the artifact's {manifest['max_model_len']} tokens")
        vocab, weight_bytes = manifest["vocab_size"], None

    def workload(run: int) -> list[Request]:
        return requests(
            args.requests, vocab, args.mean_input, args.mean_output, args.max_len, args.seed, run
        )

    rows, peer_error = [], None
    if args.peer_requests:  # first, while kiln's server does not hold the GPU's memory
        try:
            rows += peer_rows(model if model is not None else peer_model(args), workload, args, slo)
        except Exception as exc:  # the peer's failure is reported, and kiln still measured
            peer_error = f"{type(exc).__name__}: {exc}"
            print(f"transformers' continuous batching failed: {peer_error}", flush=True)
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    proc, url, _ = start_kiln(artifact, *args.server_args.split())
    try:
        rows += kiln_rows(url, proc.pid, workload, args, slo)
    finally:
        proc.terminate()
        proc.wait(60)
    print(table(rows, COLUMNS))
    floor = None
    if weight_bytes is not None:  # a decode step reads every weight at least once
        floor = round(weight_bytes / COPY_BANDWIDTH * 1e3, 3)
        print(f"TPOT floor (weights {weight_bytes / 1e9:.2f} GB at 4.25 TB/s): {floor} ms")
    record = {
        "workload": "W4",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "mean_lengths": [
            round(statistics.mean(len(r.prompt) for r in workload(0)), 1),
            round(statistics.mean(r.output_len for r in workload(0)), 1),
        ],
        "tpot_floor_ms": floor,
        "peer_error": peer_error,
        "rows": rows,
    }
    print(f"wrote {save('w4', record)}")


if __name__ == "__main__":
    main()
