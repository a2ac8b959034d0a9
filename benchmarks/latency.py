"""W3 on the GPU: one Llama-3.1-8B-shaped request, 1024-token prompt, 256 output tokens;
time to first token and time per output token, beside transformers `generate` and the
3.8 ms weight-read floor of the H200 (with --quantization, beside the floor of the weights
it reads too); then, from a profiled run, a token's GPU time: kernels and copies, the idle
time between them (by the kernels around it), the largest items."""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import time

import torch

from benchmarks.common import save, table
from benchmarks.gpu import run_all, timed_engine
from benchmarks.kernel_timing import COPY_BW
from benchmarks.models import in_memory_artifact, random_model
from benchmarks.throughput import hf_run
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sampling_params import SamplingParams


def w3(args) -> dict:
    model = random_model("llama-3.1-8b")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (4, 1024), generator=g).tolist()
    quantization = getattr(args, "quantization", None)
    artifact = in_memory_artifact(model, "llama-3.1-8b", args.workdir, quantization=quantization)
    hf = hf_latency(model, prompts[0], 32)  # the bf16 model: transformers has no int4 kernels
    del model
    gc.collect()
    torch.cuda.empty_cache()
    # decode graphs for up to 8 sequences, attention captured for 1024 + 256 positions
    config = EngineConfig(
        max_num_seqs=8, max_num_batched_tokens=2048, max_model_len=1280, num_kv_blocks=4096
    )
    engine = Engine(artifact, config)
    rows = latency_rows(engine, prompts)
    rows.append(hf)
    # every weight read once a step (BENCH's 3.8 ms counts the bf16 model's 16.06 GB so)
    weight_bytes = sum(t.nbytes for t in artifact.params.values())
    for row in rows:
        row["vs_weight_floor"] = f"{weight_bytes / COPY_BW / (row['tpot_ms'] / 1e3):.1%}"
    columns = ["system", "ttft_ms", "tpot_ms", "runner_ttft_ms", "runner_ms_per_step"]
    print(f"W3, {quantization or 'bf16'} weights: {weight_bytes / 1e9:.2f} GB a step, "
          f"floor {weight_bytes / COPY_BW * 1e3:.2f} ms")  # fmt: skip
    print(table(rows, [*columns, "host_ms_per_step", "vs_floor_3.8ms", "vs_weight_floor"]))
    split = gpu_split(engine, prompts[0], 64)
    print("GPU time a token, asynchronous steps (profiled):", split)
    record = {"workload": "W3", "rows": rows, "gpu_split": split, "weight_bytes": weight_bytes}
    return record | {"quantization": artifact.manifest["quantization"]}


def latency_rows(engine: Engine, prompts: list[list[int]]) -> list[dict]:
    """W3's rows for four 1024-token prompts: time to first token and per output token (256
    greedy tokens), with asynchronous steps and with synchronous ones, and the runner's
    share of a synchronous step."""
    run_all(engine, [prompts[0]], [8])  # warm-up, at the prompt's length: first touches
    # a prompt of its own for each run: no prefix-cache hits. As a caller sees it (nothing
    # wrapped), with asynchronous scheduling and without; then the runner's share of a step.
    rows = []
    for i, overlap in ((1, True), (2, False)):
        engine.async_scheduling = overlap
        gaps = token_gaps(engine, prompts[i], 256)
        tpot = statistics.median(gaps[1:])
        rows.append(
            {
                "system": "kiln" if overlap else "kiln, synchronous steps",
                "ttft_ms": round(gaps[0] * 1e3, 2),
                "tpot_ms": round(tpot * 1e3, 3),  # wall time from one token to the next
                "vs_floor_3.8ms": f"{3.8e-3 / tpot:.1%}",
            }
        )
    execute = engine.runner.execute
    stats = timed_engine(engine)
    token_gaps(engine, prompts[3], 256)
    rows[1]["runner_ttft_ms"] = round(stats["step"][0] * 1e3, 2)
    rows[1]["runner_ms_per_step"] = round(statistics.median(stats["step"][1:]) * 1e3, 3)
    rows[1]["host_ms_per_step"] = round(statistics.median(stats["host"][1:]) * 1e3, 3)
    engine.runner.execute = execute  # unwrapped again
    engine.async_scheduling = True
    return rows


def token_gaps(engine: Engine, prompt: list[int], n: int) -> list[float]:
    """Seconds from the request to its first token, then between tokens (greedy, n tokens)."""
    engine.add_request("w3", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
    ticks = [time.perf_counter()]  # each step makes one token: the first ends the prefill
    while engine.has_unfinished():
        engine.step()
        ticks.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(ticks)]


def idle_gaps(spans: list[tuple[float, float, str]]) -> list[tuple[float, str, str]]:
    """The idle stretches between [start, end) intervals: (length, the name of the interval
    that ran last before it, the name of the one that ends it)."""
    gaps, reach, last = [], None, ""
    for start, end, name in sorted(spans):
        if reach is not None and start > reach:
            gaps.append((start - reach, last, name))
        if reach is None or end > reach:
            reach, last = end, name
    return gaps


def gpu_split(engine: Engine, prompt: list[int], n: int, top: int = 12) -> dict:
    """Where a decode token's time goes on the GPU: the time its kernels and copies run
    (overlaps counted once), the GPU's idle time between them, and the largest items, from
    a profiler trace of the n - 1 decode steps (the prefill and its token come before it;
    with asynchronous steps the last call only reads back the last token)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    engine.add_request(
        "split", prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    )
    engine.step()  # the prefill, outside the trace
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
    spans = [
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == DeviceType.CUDA
    ]
    return split_record(spans, n - 1, top)


def split_record(spans: list[tuple[float, float, str]], steps: int, top: int = 12) -> dict:
    """Per token (`steps` of them): busy ms (some span running; overlaps once) and idle ms,
    the median idle gap, and the `top` kernels by time and pairs of kernels by the idle time
    between them, from (start us, end us, name) spans."""
    wall = max(end for _, end, _ in spans) - min(start for start, _, _ in spans)
    gaps = idle_gaps([(start, end, name[:40]) for start, end, name in spans])
    idle = sum(length for length, _, _ in gaps)
    by_name: dict[str, list[float]] = {}
    for start, end, name in spans:
        by_name.setdefault(name[:70], []).append(end - start)
    by_pair: dict[str, list[float]] = {}
    for length, before, after in gaps:
        by_pair.setdefault(f"{before} -> {after}", []).append(length)

    def per_token(groups: dict[str, list[float]], key: str) -> list[dict]:
        ranked = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
        return [
            {key: k, "per_token": round(len(t) / steps, 2), "us": round(sum(t) / steps, 1)}
            for k, t in ranked
        ]

    return {
        "tokens": steps,
        "busy_ms_per_token": round((wall - idle) / steps / 1e3, 3),
        "idle_ms_per_token": round(idle / steps / 1e3, 3),
        "median_gap_us": round(statistics.median(g for g, _, _ in gaps), 2) if gaps else 0.0,
        "largest_us_per_token": per_token(by_name, "name"),
        "idle_us_per_token_between": per_token(by_pair, "kernels"),
    }


def hf_latency(model, prompt, n: int) -> dict:
    model.config._attn_implementation = "sdpa"
    hf_run(model, [prompt], 4, "cuda")  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    hf_run(model, [prompt], n, "cuda")
    torch.cuda.synchronize()
    per = (time.perf_counter() - start) / n
    return {
        "system": f"hf generate ({n} tokens, TTFT included)",
        "ttft_ms": "",
        "tpot_ms": round(per * 1e3, 3),
        "vs_floor_3.8ms": f"{3.8e-3 / per:.1%}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--workdir", default="/tmp/kiln-bench", help="where kernels are built")
    p.add_argument("--quantization", choices=["int4", "fp8"], help="the projections' weights")
    args = p.parse_args()
    print(f"wrote {save('w3', w3(args))}")


if __name__ == "__main__":
    main()
