"""GPU offline workloads W1 (Qwen3-0.6B shape) and W2 (Llama-3.1-8B shape), with
transformers measured in the same run, and the engine timing W3 shares (benchmarks/latency.py).
Entry point: `benchmarks/throughput.py --target cuda`."""

from __future__ import annotations

import gc
import random
import statistics
import time

import torch

from benchmarks.common import table
from benchmarks.models import in_memory_artifact, random_model
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sampling_params import SamplingParams

# BENCH.md: output tok/s at the H200's bandwidth
FLOOR_TOK_S = {"W1": 35_000, "W2": 15_000}


def timed_engine(engine: Engine) -> dict:
    """Wrap the runner so every step records host (launch) time and total time."""
    stats = {"host": [], "step": [], "tokens": []}
    execute = engine.runner.execute

    def wrapped(chunks, carried=None):
        start = time.perf_counter()
        logits = execute(chunks, carried)
        host = time.perf_counter() - start
        torch.cuda.synchronize()
        stats["host"].append(host)
        stats["step"].append(time.perf_counter() - start)
        stats["tokens"].append(sum(c.num_tokens for c in chunks))
        return logits

    engine.runner.execute = wrapped
    return stats


def run_all(engine: Engine, prompts, out_lens, logprobs: int | None = None) -> tuple[float, int]:
    for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True)):
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)
        engine.add_request(f"r{i}", p, params)
    produced, start = 0, time.perf_counter()
    while engine.has_unfinished():
        produced += sum(len(o.token_ids) for u in engine.step() for o in u.outputs)
    torch.cuda.synchronize()
    return time.perf_counter() - start, produced


def hf_generate_batch(model, prompts, max_new: int) -> dict:
    """transformers' continuous batching (`generate_batch`, SDPA) on `prompts`."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    model.config._attn_implementation = "sdpa"
    model.generate_batch(
        [p[:16] for p in prompts[:4]],
        generation_config=GenerationConfig(max_new_tokens=4, do_sample=False),
    )
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=config)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    return throughput_row(
        f"hf generate_batch ({len(prompts)} req, {max_new} out)", [(elapsed, tokens)]
    )


def hf_generate_static(model, prompts, max_new: int) -> dict:
    """transformers `generate` on `prompts` as one static batch (left-padded, SDPA)."""
    model.config._attn_implementation = "sdpa"
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")

    def run(n: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        assert out.shape[1] - width == n
        return time.perf_counter() - start

    run(4)  # warm-up
    elapsed = run(max_new)
    return throughput_row(
        f"hf generate, static ({len(prompts)} req, {max_new} out)",
        [(elapsed, max_new * len(prompts))],
    )


def w1(args) -> dict:
    """W1: Qwen3-0.6B shape, 256 requests of 100-1024 tokens in and out."""
    model = random_model("qwen3-0.6b")
    prompts, out_lens = w1_requests(args.requests, model.config.vocab_size)
    config = w1_config(args.budget)
    return offline(args, "W1", model, "qwen3-0.6b", prompts, out_lens, config)


def w2(args) -> dict:
    """W2: Llama-3.1-8B shape, 1000 requests (--requests) of 1000 tokens in and out."""
    model = random_model("llama-3.1-8b")
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(1000)] for _ in range(args.requests)]
    config = w2_config(args.budget)
    return offline(args, "W2", model, "llama-3.1-8b", prompts, [1000] * args.requests, config)


def offline(args, workload: str, model, name: str, prompts, out_lens, config: EngineConfig) -> dict:
    """Every request at once through the Engine, `--repeats` times, beside transformers'
    `generate_batch` and static-batch `generate` on the first `--peer-requests` of them
    (measured first, before the engine takes the memory) and the floor."""
    peers = []
    if args.peer_requests and not args.no_peer:
        sub = prompts[: args.peer_requests]
        max_new = round(statistics.mean(out_lens[: args.peer_requests]))
        peers = [hf_generate_batch(model, sub, max_new), hf_generate_static(model, sub, max_new)]
    artifact = in_memory_artifact(model, name, args.workdir)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    engine = Engine(artifact, config)
    kiln_rows, host = throughput_rows(
        engine, prompts, out_lens, args.runner_split, args.logprobs, args.repeats
    )
    rows = kiln_rows + peers
    floor = FLOOR_TOK_S[workload]
    for row in rows:
        row["vs_floor"] = f"{row['tok_s'] / floor:.1%}"
    print(table(rows, ["system", "seconds", "output_tokens", "tok_s", "min-max", "vs_floor"]))
    for peer in peers:
        print(f"kiln / {peer['system']}: {kiln_rows[0]['tok_s'] / peer['tok_s']:.1f}x")
    print(f"floor: {floor} tok/s; steps: {host}")
    return {
        "workload": workload,
        "logprobs": args.logprobs,
        "rows": rows,
        "floor_tok_s": floor,
        "steps": host,
        "kv_cache_tokens": engine.runner.num_tokens,
    }


def w1_requests(n: int, vocab: int) -> tuple[list[list[int]], list[int]]:
    """W1's requests: random prompts of 100-1024 tokens, outputs of 100-1024 tokens."""
    rng = random.Random(0)
    lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(n)]
    return [[rng.randrange(vocab) for _ in range(i)] for i, _ in lens], [o for _, o in lens]


def w1_config(budget: int) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=256,
        max_num_batched_tokens=budget,
        max_model_len=2048,  # inputs and outputs are at most 1024 each
        gpu_memory_utilization=0.85,
        enable_prefix_caching=False,  # random prompts share nothing; a rerun must not hit
    )


def w2_config(budget: int = 8192) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=512,
        max_num_batched_tokens=budget,
        max_model_len=2048,
        gpu_memory_utilization=0.85,
        enable_prefix_caching=False,
    )


def throughput_rows(
    engine: Engine,
    prompts,
    out_lens,
    runner_split: bool = False,
    logprobs: int | None = None,
    repeats: int = 1,
) -> tuple[list[dict], dict | None]:
    """Every request at once, greedy (each token with its `logprobs` top logprobs, if set),
    `repeats` times: a row of output tok/s, the median with min-max (and with runner_split
    another, each step run to its end before the next, and the steps' split)."""
    run_all(engine, [p[:50] for p in prompts[:8]], [16] * 8, logprobs)  # warm-up
    # the start-up heap (hundreds of thousands of objects) out of the collector's way, as
    # `kiln run` does once it is ready: a full collection walking it costs ~0.2 s mid-run
    gc.collect()
    gc.freeze()
    runs = [run_all(engine, prompts, out_lens, logprobs) for _ in range(repeats)]
    rows = [throughput_row(f"kiln ({len(prompts)} req)", runs)]
    host = None
    if runner_split:  # again, each step run to its end before the next: the runner's share
        engine.async_scheduling = False
        stats = timed_engine(engine)
        runs = [run_all(engine, prompts, out_lens, logprobs)]
        rows.append(throughput_row("kiln, synchronous steps", runs))
        host = _step_split(stats)
    gc.unfreeze()
    return rows, host


def throughput_row(system: str, runs: list[tuple[float, int]]) -> dict:
    """(seconds, tokens) runs of one workload: the median run's figures and the tok/s range."""
    rates = sorted(produced / seconds for seconds, produced in runs)
    seconds, produced = sorted(runs, key=lambda r: r[1] / r[0])[(len(runs) - 1) // 2]
    return {
        "system": system,
        "seconds": round(seconds, 2),
        "output_tokens": produced,
        "tok_s": round(produced / seconds, 1),
        "min-max": f"{rates[0]:.1f}-{rates[-1]:.1f}",
    }


def _step_split(stats: dict) -> dict:
    decode = [
        (h, s)
        for h, s, t in zip(stats["host"], stats["step"], stats["tokens"], strict=True)
        if t <= 256
    ]
    return {
        "steps": len(stats["step"]),
        "median_step_ms": round(statistics.median(stats["step"]) * 1e3, 2),
        "median_host_ms_decode": round(statistics.median(h for h, _ in decode) * 1e3, 2)
        if decode
        else None,
        "median_step_ms_decode": round(statistics.median(s for _, s in decode) * 1e3, 2)
        if decode
        else None,
        # wall time inside the runner (launch + GPU), all steps and decode steps; the rest of
        # `seconds` is the engine's own host work (scheduling, sampling, outputs)
        "execute_s": round(sum(stats["step"]), 2),
        "execute_s_decode": round(sum(s for _, s in decode), 2),
    }
