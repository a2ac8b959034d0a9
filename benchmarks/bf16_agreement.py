"""How far two bf16 runs of one model can agree, on the CPU: the teacher-forced next-token
argmaxes of kiln's torch-op executor (the kernels' reference, rounding to bf16 where
transformers does except inside attention) against transformers' bf16 and float32 runs of
the same random-weight model, at several depths (16 prompts x 64 positions, as the GPU test),
and transformers' bf16 with SDPA against its own eager attention: how far two attention
implementations of one library agree.

    python -m benchmarks.bf16_agreement --layers 1 4 28
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace

import torch

from benchmarks.common import save, table
from benchmarks.models import in_memory_artifact, random_model
from runtime.batch import build_batch
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.executor import Executor

PROMPTS, POSITIONS = 16, 64


def agreement(name: str, layers: int) -> dict:
    model = random_model(name, "cpu", torch.bfloat16, logit_scale=10.0, num_hidden_layers=layers)
    artifact = in_memory_artifact(model, name, tempfile.mkdtemp(), target="cpu")
    engine = Engine(artifact, EngineConfig(num_kv_blocks=PROMPTS * POSITIONS // 16 + 16))
    ids = torch.randint(
        0, model.config.vocab_size, (PROMPTS, POSITIONS), generator=torch.Generator().manual_seed(0)
    )
    per = -(-POSITIONS // engine.runner.block_size)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(PROMPTS)]
    chunks = [(row.tolist(), 0, t) for row, t in zip(ids, tables, strict=True)]
    batch = build_batch(chunks, engine.runner.block_size, device="cpu")
    batch = replace(batch, logits_indices=torch.arange(batch.num_tokens))
    ours = Executor(artifact.graph, engine.runner.params).forward(batch, engine.runner.kv_caches)
    with torch.no_grad():
        model.config._attn_implementation = "eager"
        eager = model(ids).logits.flatten(0, 1)
        model.config._attn_implementation = "sdpa"
        theirs = model(ids).logits.flatten(0, 1)
        exact = model.float()(ids).logits.flatten(0, 1)
    top = exact.argmax(-1)
    same = lambda a, b: round((a.argmax(-1) == b).float().mean().item(), 4)  # noqa: E731
    return {
        "model": name,
        "layers": layers,
        "kiln_vs_hf_bf16": same(ours, theirs.argmax(-1)),
        "kiln_vs_fp32": same(ours, top),
        "hf_bf16_vs_fp32": same(theirs, top),
        "hf_sdpa_vs_eager_bf16": same(eager, theirs.argmax(-1)),
        "mean_abs_logit_diff": round((ours.float() - theirs.float()).abs().mean().item(), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--layers", type=int, nargs="+", default=[1, 4, 28])
    args = p.parse_args()
    torch.manual_seed(0)
    rows = [agreement(args.model, n) for n in args.layers]
    print(table(rows, list(rows[0])))
    print(f"wrote {save('bf16-agreement', {'rows': rows})}")


if __name__ == "__main__":
    main()
