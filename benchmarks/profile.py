"""Where a step's GPU time goes: torch.profiler over the steps of a random model.

Prints the CUDA kernels by total time (ours by name, cuBLAS and torch ops by theirs), for
`--batch` sequences of `--context` tokens each: of the decode step with the most sequences,
or with `--prefill` of the first step that prefills (`--budget` tokens at most).
"""

from __future__ import annotations

import argparse
import logging
import random

import torch

from benchmarks.gpu import run_all
from benchmarks.models import in_memory_artifact, random_model
from runtime.config import EngineConfig
from runtime.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--layers", type=int, help="fewer layers than the config")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--graphs", action="store_true", help="profile CUDA-graph replays")
    p.add_argument("--prefill", action="store_true", help="profile a prefill step instead")
    p.add_argument("--budget", type=int, help="max_num_batched_tokens (default: a context)")
    p.add_argument("--workdir", default="/tmp/kiln-profile")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)  # kernel coverage: nodes that stay torch ops
    for noisy in ("numba", "torch", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    model = random_model(args.model, **overrides)
    vocab = model.config.vocab_size
    artifact = in_memory_artifact(model, args.model, args.workdir)
    del model
    torch.cuda.empty_cache()
    blocks = args.batch * (-(-(args.context + args.steps + 8) // 16)) + 16
    engine = Engine(
        artifact,
        EngineConfig(
            max_num_seqs=args.batch,
            max_model_len=args.context + args.steps + 16,
            max_num_batched_tokens=args.budget or max(2048, args.context),
            num_kv_blocks=blocks,
            cuda_graphs=args.graphs,
        ),
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(vocab) for _ in range(args.context)] for _ in range(args.batch)]
    run_all(engine, [p[:32] for p in prompts], [4] * args.batch)  # warm-up
    profiles = []  # (sequences, tokens, profile) of the steps of the wanted kind
    execute = engine.runner.execute

    def profiled(chunks, carried=None):
        decode = all(c.num_tokens == 1 for c in chunks)
        if decode == args.prefill or (args.prefill and profiles):
            return execute(chunks, carried)
        torch.cuda.synchronize()  # nothing of the last step's sampling in the window
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            logits = execute(chunks, carried)
            torch.cuda.synchronize()
        profiles.append((len(chunks), sum(c.num_tokens for c in chunks), prof))
        return logits

    engine.runner.execute = profiled
    run_all(engine, prompts, [args.steps] * args.batch)
    seqs, tokens, prof = max(profiles, key=lambda p: p[0])  # the fullest step
    kind = "prefill" if args.prefill else "decode"
    print(
        f"{args.model} ({args.layers or 'all'} layers), context {args.context}: one {kind} "
        f"step of {seqs} sequences, {tokens} tokens, {'graph' if args.graphs else 'eager'}"
    )
    table = prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=60, max_name_column_width=90
    )
    print(table)


if __name__ == "__main__":
    main()
