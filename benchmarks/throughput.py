"""Offline throughput: Kiln vs transformers on the same machine, same model, same run.

--target cpu (C1, default): the SmolLM2 artifact, 128 in / 128 out, single stream and 16
concurrent, with transformers `generate` (one stream, and a static batch of 16) as the peer.
--target cuda: W1 (Qwen3-0.6B shape, 256 requests of 100-1024 in / out) or with --workload w2
W2 (Llama-3.1-8B shape, 1000 requests of 1000 in / out), with transformers `generate_batch`
and static-batch `generate` on the first --peer-requests of them, and the ratio to the
H200's floor (~35k and ~15k tok/s).
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import save, table
from compiler.compile import is_current
from compiler.frontend.loader import load_model
from kiln import LLM, SamplingParams
from kiln.api import compile as kiln_compile


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def kiln_run(llm: LLM, batch: list[list[int]], out_len: int) -> float:
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    outs = llm.generate(batch, params, use_tqdm=False)
    assert all(len(o.token_ids) == out_len for o in outs)
    return out_len * len(batch)


def hf_run(model, batch: list[list[int]], out_len: int, device: str = "cpu") -> float:
    """transformers `generate` of exactly out_len greedy tokens per prompt; tokens made."""
    ids = torch.tensor(batch, device=device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=0,
        )
    return (out.shape[1] - ids.shape[1]) * out.shape[0]


def measure(system: str, run, batch, out_len: int, repeats: int) -> dict:
    """Warm-up on the same shapes, then the median (min-max) of `repeats` runs."""
    run(batch, 4)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run(batch, out_len)
        rates.append(tokens / (time.perf_counter() - start))
    return {
        "system": system,
        "streams": len(batch),
        "output_tokens": tokens,
        "tok_s": round(statistics.median(rates), 1),
        "min-max": f"{min(rates):.1f}-{max(rates):.1f}",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", default="builtin:smollm2", help="cpu (C1): the model")
    p.add_argument(
        "--artifact",
        type=Path,
        default=Path("artifacts/smollm2-cpu"),
        help="cpu (C1): compiled from --source when missing or stale",
    )
    p.add_argument("--input-len", type=int, default=128, help="cpu (C1)")
    p.add_argument("--output-len", type=int, default=128, help="cpu (C1)")
    p.add_argument("--concurrency", type=int, default=16, help="cpu (C1)")
    p.add_argument("--target", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--workload",
        choices=["w1", "w2"],
        default="w1",
        help="cuda: W1 (Qwen3-0.6B shape) or W2 (Llama-3.1-8B shape, 1000 in / 1000 out)",
    )
    p.add_argument("--requests", type=int, help="cuda: requests (default: W1 256, W2 1000)")
    p.add_argument(
        "--peer-requests", type=int, default=16, help="cuda: transformers runs this many"
    )
    p.add_argument("--budget", type=int, default=8192, help="cuda: max_num_batched_tokens")
    p.add_argument(
        "--runner-split",
        action="store_true",
        help="cuda: run W1 again with synchronous steps, timing the runner's share of each",
    )
    p.add_argument("--logprobs", type=int, help="cuda: every token with this many top logprobs")
    p.add_argument("--workdir", default="/tmp/kiln-bench", help="cuda: where kernels are built")
    p.add_argument("--repeats", type=int, default=3, help="runs of each; the median is shown")
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.target == "cuda":
        from benchmarks import gpu

        args.requests = args.requests or {"w1": 256, "w2": 1000}[args.workload]
        print(f"wrote {save(args.workload, getattr(gpu, args.workload)(args))}")
        return
    if not is_current(args.artifact):  # missing, or compiled by other code
        kiln_compile(args.source, args.artifact)
    llm = LLM(args.artifact)
    vocab = llm.engine.vocab_size
    single = prompts(1, args.input_len, vocab)
    many = prompts(args.concurrency, args.input_len, vocab, 1)

    def kiln(batch, n):
        return kiln_run(llm, batch, n)

    rows = [measure("kiln", kiln, b, args.output_len, args.repeats) for b in (single, many)]
    if not args.no_peer:
        model = load_model(args.source, torch.float32).model
        model.config._attn_implementation = "sdpa"

        def hf(batch, n):
            return hf_run(model, batch, n)

        rows += [
            measure("hf generate", hf, b, args.output_len, args.repeats) for b in (single, many)
        ]
    scaling = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(table(rows, ["system", "streams", "output_tokens", "tok_s", "min-max"]))
    print(f"kiln {args.concurrency}-stream / 1-stream aggregate: {scaling:.2f}x")
    if not args.no_peer:
        print(f"kiln / hf single stream: {rows[0]['tok_s'] / rows[2]['tok_s']:.2f}x")
        print(f"kiln / hf {args.concurrency} streams: {rows[1]['tok_s'] / rows[3]['tok_s']:.2f}x")
    path = save(
        "throughput-c1", {"workload": vars(args) | {"artifact": str(args.artifact)}, "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
