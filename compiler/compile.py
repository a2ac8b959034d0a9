"""`kiln compile`: load -> trace -> optimize -> write the artifact."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compiler.artifact import write_artifact
from compiler.frontend import load_model, trace_model
from compiler.pipeline import run_pipeline
from ir.ops import PagedAttention
from ir.reference import TORCH_DTYPES

log = logging.getLogger(__name__)
KILN_VERSION = "0.1.0"
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample")


@dataclass(frozen=True, slots=True)
class CompileOptions:
    dtype: str | None = None  # default: float32 on cpu, bfloat16 on cuda
    target: str = "cpu"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    dump_ir: Path | None = None


def compile_model(source: str, out: Path, options: CompileOptions = CompileOptions()) -> Path:
    if options.target != "cpu":
        raise ValueError(f"unknown target {options.target!r} (supported: cpu)")
    dtype = options.dtype or DEFAULT_DTYPE[options.target]
    steps = tqdm(total=4, desc="kiln compile", unit="step")
    steps.set_postfix_str("load")
    loaded = load_model(source, TORCH_DTYPES[dtype])
    steps.update()
    steps.set_postfix_str("trace")
    graph, params = trace_model(loaded.model)
    before = graph.op_counts()
    steps.update()
    steps.set_postfix_str("optimize")
    graph, params = run_pipeline(graph, params, dump_dir=options.dump_ir)
    log.info("ops before passes: %s", before)
    log.info("ops after passes:  %s", graph.op_counts())
    steps.update()
    steps.set_postfix_str("write")
    config = loaded.model.config
    manifest = {
        "kiln_version": KILN_VERSION,
        "source": loaded.source,
        "source_sha256": loaded.source_sha256,
        "architecture": architecture_summary(config, graph),
        "dtype": dtype,
        "quantization": None,
        "target": options.target,
        "max_model_len": options.max_model_len or config.max_position_embeddings,
        "block_size": options.block_size,
        "vocab_size": config.vocab_size,
        "eos_token_ids": eos_token_ids(loaded),
        "op_counts": {"before": before, "after": graph.op_counts()},
    }
    path = write_artifact(
        out, manifest, graph, params, loaded.tokenizer, generation_defaults(loaded.model)
    )
    steps.update()
    steps.close()
    return path


def architecture_summary(config, graph) -> dict:
    attn = [n.op for n in graph.nodes if isinstance(n.op, PagedAttention)]
    return {
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or []),
        "num_layers": len(attn),
        "hidden_size": config.hidden_size,
        "num_heads": attn[0].num_heads,
        "num_kv_heads": attn[0].num_kv_heads,
        "head_dim": attn[0].head_dim,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
    }


def eos_token_ids(loaded) -> list[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config, loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else value or [])
    return sorted(ids)


def generation_defaults(model: torch.nn.Module) -> dict:
    gen = model.generation_config.to_diff_dict()
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}
