"""Tensor parallelism on the GPUs of one host: one rank against N (default 2), one engine at
a time, the same random-weight models compiled for each.

Llama-3.1-8B shape:
- greedy parity: 16 prompts (16-512 tokens), 32 greedy tokens each. N ranks must give one
  rank's tokens, or leave them only where one rank's own logits hold a near-tie (two tokens
  within `NEAR_TIE_ULPS` bf16 ulps: rounding, of sums taken in another order across ranks,
  decides those). Teacher-forced along one rank's tokens, the two runs' logits are compared
  too.
- W3: one 1024-token request, 256 output tokens (time per output token).
- W2 (with --w2-requests): offline, 1000-token prompts and outputs.
Qwen3-0.6B shape: W1, 256 requests (unless --no-w1).

`python -m benchmarks.tensor_parallel [--tensor-parallel-size 2] [--w2-requests 1000]` needs
that many GPUs.
"""

from __future__ import annotations

import argparse
import gc
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import save, table
from benchmarks.gpu import throughput_rows, w1_config, w1_requests, w2_config
from benchmarks.latency import latency_rows
from benchmarks.models import in_memory_artifact, random_model, sharded_artifact
from runtime.batch import build_batch
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.outputs import merge_update
from runtime.sampling_params import SamplingParams

NEAR_TIE_ULPS = 4  # a flip between tokens whose logits are this close is rounding
PARITY_PROMPTS, PARITY_TOKENS = 16, 32


@dataclass(frozen=True)
class Greedy:
    tokens: list[list[int]]  # each prompt's greedy output
    logits: torch.Tensor  # [prompts, tokens, vocab] float32: teacher-forced, see greedy_run
    dtype: torch.dtype  # the model's logits'


def generate(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    results = {}
    while engine.has_unfinished():
        for u in engine.step():
            results[u.request_id] = merge_update(results.get(u.request_id), u)
    return [results[str(i)].token_ids for i in range(len(prompts))]


def teacher_logits(engine: Engine, prompts: list[list[int]], outputs: list[list[int]]):
    """One eager step over every prompt + output: the logits that chose each output token,
    [prompts, tokens, vocab] float32 on the host. Uses KV blocks from 0 up: run it on an
    idle engine without prefix caching."""
    runner = engine.runner
    seqs = [p + o[:-1] for p, o in zip(prompts, outputs, strict=True)]
    per = -(-max(map(len, seqs)) // runner.block_size)
    chunks = [(s, 0, list(range(i * per, (i + 1) * per))) for i, s in enumerate(seqs)]
    batch = build_batch(chunks, runner.block_size, device=runner.device)
    starts = batch.query_start.tolist()
    rows = [
        starts[i] + len(p) - 1 + j for i, p in enumerate(prompts) for j in range(len(outputs[i]))
    ]
    wanted = torch.tensor(rows, dtype=torch.int64, device=runner.device)
    return runner.forward(replace(batch, logits_indices=wanted))


def greedy_run(engine: Engine, prompts, n: int, along: Greedy | None = None) -> Greedy:
    """Greedy tokens, and the logits teacher-forced along `along`'s tokens (else these)."""
    tokens = generate(engine, prompts, n)
    logits = teacher_logits(engine, prompts, along.tokens if along else tokens)
    rows = logits.float().cpu().view(len(prompts), -1, logits.shape[-1])
    return Greedy(tokens, rows, logits.dtype)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at |x| (normal range)."""
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(x.abs())))


def compare(ref: Greedy, other: Greedy) -> dict:
    """How `other` departs from `ref`: prompts with equal tokens; for the others, the first
    differing position and ref's margin there (its token's logit minus other's token's, in
    ulps of the logits' dtype at the larger one, and in units of the logits' std); the
    teacher-forced logits' differences and argmax agreement."""
    std = ref.logits.std().item()
    divergences = []
    for i, (a, b) in enumerate(zip(ref.tokens, other.tokens, strict=True)):
        j = next((j for j, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        if j is not None:
            mine, theirs = ref.logits[i, j, a[j]], ref.logits[i, j, b[j]]
            margin = (mine - theirs).item()
            spacing = ulp(torch.maximum(mine.abs(), theirs.abs()), ref.dtype).item()
            divergences.append(
                {
                    "prompt": i,
                    "position": j,
                    "margin_ulps": round(margin / spacing, 2),
                    "margin_std": round(margin / std, 4),
                }
            )
    err = (ref.logits - other.logits).abs()
    agree = (ref.logits.argmax(-1) == other.logits.argmax(-1)).float().mean().item()
    return {
        "prompts": len(ref.tokens),
        "equal": len(ref.tokens) - len(divergences),
        "divergences": divergences,
        "logit_std": round(std, 4),
        "mean_err_std": round(err.mean().item() / std, 5),
        "max_err_std": round(err.max().item() / std, 4),
        "teacher_forced_argmax_agreement": round(agree, 4),
        "within_tolerance": all(d["margin_ulps"] <= NEAR_TIE_ULPS for d in divergences),
    }


def w3_config() -> EngineConfig:
    # decode graphs for up to 8 sequences, attention captured for 1024 + 256 positions
    return EngineConfig(
        max_num_seqs=8,
        max_num_batched_tokens=2048,
        max_model_len=1280,
        num_kv_blocks=4096,
        enable_prefix_caching=False,  # the parity check's teacher forcing writes any block
    )


def free() -> None:
    """Give the GPU memory of what was just dropped back (before the next engine sizes its
    KV cache from what is free)."""
    gc.collect()
    torch.cuda.empty_cache()


def llama(args) -> dict:
    """Parity, W3 and W2 on the Llama-3.1-8B shape at one rank and at N."""
    name, tp = "llama-3.1-8b", args.tensor_parallel_size
    model = random_model(name, num_hidden_layers=args.layers)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    w3_prompts = torch.randint(0, vocab, (4, 1024), generator=g).tolist()
    rng = random.Random(1)
    parity = [
        [rng.randrange(vocab) for _ in range(rng.randint(16, 512))] for _ in range(PARITY_PROMPTS)
    ]
    w2_prompts = [[rng.randrange(vocab) for _ in range(1000)] for _ in range(args.w2_requests)]
    artifacts = {
        1: in_memory_artifact(model, name, args.workdir / "llama-tp1"),
        tp: sharded_artifact(model, name, args.workdir / f"llama-tp{tp}", tp),
    }
    del model
    free()
    record: dict = {"w3": {}, "w2": {}}
    ref = None
    for size in (1, tp):
        artifact = artifacts.pop(size)
        engine = Engine(artifact, w3_config())
        run = greedy_run(engine, parity, PARITY_TOKENS, along=ref)
        if ref is None:
            ref = run
        else:
            record["parity"] = compare(ref, run)
            print("parity:", record["parity"], flush=True)
        record["w3"][size] = latency_rows(engine, w3_prompts)
        print(f"W3 TP={size}:", record["w3"][size], flush=True)
        engine.close()
        del engine
        free()
        if args.w2_requests:
            engine = Engine(artifact, w2_config())
            rows, _ = throughput_rows(engine, w2_prompts, [1000] * args.w2_requests)
            record["w2"][size] = rows[0] | {"kv_cache_tokens": engine.runner.num_tokens}
            print(f"W2 TP={size}:", record["w2"][size], flush=True)
            engine.close()
            del engine
        del artifact
        free()
    return record


def qwen_w1(args) -> dict:
    """W1 on the Qwen3-0.6B shape at one rank and at N."""
    name, tp = "qwen3-0.6b", args.tensor_parallel_size
    model = random_model(name)
    prompts, out_lens = w1_requests(256, model.config.vocab_size)
    artifacts = {
        1: in_memory_artifact(model, name, args.workdir / "qwen-tp1"),
        tp: sharded_artifact(model, name, args.workdir / f"qwen-tp{tp}", tp),
    }
    del model
    free()
    out = {}
    for size in (1, tp):
        engine = Engine(artifacts.pop(size), w1_config(8192))
        rows, _ = throughput_rows(engine, prompts, out_lens)
        out[size] = rows[0] | {"kv_cache_tokens": engine.runner.num_tokens}
        print(f"W1 TP={size}:", out[size], flush=True)
        engine.close()
        del engine
        free()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--layers", type=int, default=32, help="Llama-3.1-8B shape: layers")
    p.add_argument("--w2-requests", type=int, default=0, help="W2 requests (0: no W2)")
    p.add_argument("--no-llama", action="store_true", help="skip parity, W3 and W2")
    p.add_argument("--no-w1", action="store_true", help="skip W1 (Qwen3-0.6B shape)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/kiln-bench"))
    args = p.parse_args()
    if torch.cuda.device_count() < args.tensor_parallel_size:
        p.error(f"needs {args.tensor_parallel_size} GPUs, torch sees {torch.cuda.device_count()}")
    record = {"workload": "TP", "tensor_parallel_size": args.tensor_parallel_size}
    if not args.no_llama:
        record |= llama(args)
    if not args.no_w1:
        record["w1"] = qwen_w1(args)
    print_record(record)
    print(f"wrote {save('tp', record)}")


def print_record(record: dict) -> None:
    tp = record["tensor_parallel_size"]
    if "parity" in record:
        print("parity (Llama-3.1-8B shape, greedy):", record["parity"])
        rows = []
        for size, w3 in record["w3"].items():
            rows += [r | {"system": f"{r['system']}, TP={size}"} for r in w3]
        columns = ["system", "ttft_ms", "tpot_ms", "runner_ms_per_step", "vs_floor_3.8ms"]
        print(table(rows, columns))
        one, many = record["w3"][1][0]["tpot_ms"], record["w3"][tp][0]["tpot_ms"]
        print(f"W3 speed-up TP={tp} / TP=1: {one / many:.2f}x")
    for workload in ("w2", "w1"):
        runs = record.get(workload) or {}
        if runs:
            rows = [r | {"system": f"TP={size}"} for size, r in runs.items()]
            print(table(rows, ["system", "seconds", "output_tokens", "tok_s", "kv_cache_tokens"]))
            print(f"{workload.upper()} speed-up: {runs[tp]['tok_s'] / runs[1]['tok_s']:.2f}x")


if __name__ == "__main__":
    main()
