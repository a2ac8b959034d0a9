"""Offline throughput: Kiln vs transformers on the same machine, same model, same run.

C1 (CPU, default): the SmolLM2 artifact, 128 in / 128 out, single stream and 16 concurrent,
with transformers `generate` (single stream, and a static batch of 16) as the peer.
"""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch

from benchmarks.common import save, table
from compiler.frontend.loader import load_model
from kiln import LLM, SamplingParams
from kiln.api import compile as kiln_compile


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def kiln_run(llm: LLM, batch: list[list[int]], out_len: int) -> dict:
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(batch, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {
        "seconds": round(elapsed, 3),
        "output_tokens": tokens,
        "tok_s": round(tokens / elapsed, 1),
    }


def hf_run(model, batch: list[list[int]], out_len: int) -> dict:
    ids = torch.tensor(batch)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=out_len,
            min_new_tokens=out_len,
            do_sample=False,
            pad_token_id=0,
        )
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - ids.shape[1]) * out.shape[0]
    return {
        "seconds": round(elapsed, 3),
        "output_tokens": tokens,
        "tok_s": round(tokens / elapsed, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--source", default="builtin:smollm2")
    p.add_argument("--artifact", type=Path, default=Path("artifacts/smollm2-cpu"))
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--no-peer", action="store_true", help="skip transformers")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if not (args.artifact / "manifest.json").exists():
        kiln_compile(args.source, args.artifact)
    llm = LLM(args.artifact)
    vocab = llm.engine.vocab_size
    single, many = (
        prompts(1, args.input_len, vocab),
        prompts(args.concurrency, args.input_len, vocab, 1),
    )
    kiln_run(llm, prompts(2, 16, vocab, 9), 8)  # warm-up
    rows = [
        {"system": "kiln", "streams": 1, **kiln_run(llm, single, args.output_len)},
        {"system": "kiln", "streams": args.concurrency, **kiln_run(llm, many, args.output_len)},
    ]
    if not args.no_peer:
        model = load_model(args.source, torch.float32).model
        model.config._attn_implementation = "sdpa"
        hf_run(model, prompts(1, 16, vocab, 9), 8)  # warm-up
        rows.append(
            {"system": "hf generate", "streams": 1, **hf_run(model, single, args.output_len)}
        )
        rows.append(
            {
                "system": "hf generate",
                "streams": args.concurrency,
                **hf_run(model, many, args.output_len),
            }
        )
    scaling = rows[1]["tok_s"] / rows[0]["tok_s"]
    print(table(rows, ["system", "streams", "seconds", "output_tokens", "tok_s"]))
    print(f"kiln {args.concurrency}-stream / 1-stream aggregate: {scaling:.2f}x")
    if not args.no_peer:
        print(f"kiln / hf single stream: {rows[0]['tok_s'] / rows[2]['tok_s']:.2f}x")
    path = save(
        "throughput-c1", {"workload": vars(args) | {"artifact": str(args.artifact)}, "rows": rows}
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
