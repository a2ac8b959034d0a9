"""`kiln compile`: load -> trace -> optimize -> write the artifact."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compiler.artifact import check_output, write_artifact
from compiler.frontend import LoadedModel, load_model, trace_model
from compiler.passes.shard import shard
from compiler.pipeline import CUDA_PASSES, PIPELINE, run_pipeline, run_target_passes
from ir.graph import Graph
from ir.ops import PagedAttention
from ir.printer import print_graph
from ir.reference import DTYPE_NAMES, TORCH_DTYPES

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
    arch: str = "sm_90"  # cuda target: the GPU architecture kernels are built for
    tensor_parallel_size: int = 1  # > 1: one graph, weights sharded per rank (passes/shard.py)

    def __post_init__(self) -> None:
        if self.target not in DEFAULT_DTYPE:
            raise ValueError(f"unknown target {self.target!r} (supported: cpu, cuda)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")


def compile_model(source: str, out: Path, options: CompileOptions = CompileOptions()) -> Path:
    check_output(Path(out).resolve())  # before the minutes of work, not after
    dtype = options.dtype or DEFAULT_DTYPE[options.target]
    log.info("loading %s", source)
    return compile_loaded(load_model(source, TORCH_DTYPES[dtype]), out, options)


def compile_loaded(loaded: LoadedModel, out: Path, options: CompileOptions) -> Path:
    """Compile a model already in memory (its parameters' dtype is the artifact's)."""
    built = build(loaded, options)
    return write_artifact(
        out,
        built.manifest,
        built.graph,
        built.weights,
        loaded.tokenizer,
        generation_defaults(loaded.model),
        extra_files=built.files,
    )


@dataclass(frozen=True, slots=True)
class Built:
    """Everything an artifact holds, in memory."""

    manifest: dict
    graph: Graph
    weights: dict  # name -> tensor, or (tensor parallel) one such dict per rank
    files: dict[str, bytes]  # kernels/*.cubin, *.ptx for the cuda target


def build(loaded: LoadedModel, options: CompileOptions) -> Built:
    dtype = DTYPE_NAMES[next(loaded.model.parameters()).dtype]
    steps = tqdm(total=3, desc="kiln compile", unit="step")
    steps.set_postfix_str("trace")
    graph, params = trace_model(loaded.model)
    before = graph.op_counts()
    steps.update()
    steps.set_postfix_str("optimize")
    graph, params = run_pipeline(graph, params, dump_dir=options.dump_ir)
    architecture = architecture_summary(loaded.model.config, graph)  # of the whole model
    graph, weights = _shard(graph, params, options)
    if options.target == "cuda":
        graph = run_target_passes(graph, CUDA_PASSES, options.dump_ir)
    log.info("ops before passes: %s", before)
    log.info("ops after passes:  %s", graph.op_counts())
    steps.update()
    steps.set_postfix_str("kernels" if options.target == "cuda" else "write")
    config = loaded.model.config
    manifest = {
        "kiln_version": KILN_VERSION,
        "source": loaded.source,
        "source_sha256": loaded.source_sha256,
        "architecture": architecture,
        "dtype": dtype,
        "quantization": None,
        "target": options.target,
        "max_model_len": options.max_model_len or config.max_position_embeddings,
        "block_size": options.block_size,
        "vocab_size": config.vocab_size,
        "eos_token_ids": eos_token_ids(loaded),
        "op_counts": {"before": before, "after": graph.op_counts()},
    }
    files: dict[str, bytes] = {}
    if options.target == "cuda":
        from compiler.kernels import compile_graph_kernels

        manifest["kernels"], files = compile_graph_kernels(graph, options.arch, options.block_size)
    if options.tensor_parallel_size > 1:  # absent: TP=1 artifacts are unchanged
        manifest["tensor_parallel_size"] = options.tensor_parallel_size
    steps.update()
    steps.close()
    return Built(manifest, graph, weights, files)


def _shard(graph, params, options: CompileOptions):
    """(graph, params) unchanged at TP=1, else the per-rank graph and a weights dict per rank."""
    tp = options.tensor_parallel_size
    if tp == 1:
        return graph, params
    graph, weights = shard(graph, params, tp)
    log.info("sharded over %d ranks: %s", tp, graph.op_counts())
    if options.dump_ir:
        (options.dump_ir / f"{len(PIPELINE) + 2:02d}_shard.ir").write_text(print_graph(graph))
    return graph, weights


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
