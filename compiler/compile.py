"""`kiln compile`: load -> trace -> optimize -> write the artifact."""

from __future__ import annotations

import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from compiler.artifact import ArtifactError, check_output, read_manifest, write_artifact
from compiler.frontend import LoadedModel, load_model, trace_model
from compiler.frontend.loader import from_memory
from compiler.frontend.module import from_module
from compiler.passes.fold_constants import fold_constants
from compiler.passes.prequantized import use_packed
from compiler.passes.quantize import lm_head, quantize_linears
from compiler.passes.shard import shard
from compiler.pipeline import CUDA_PASSES, PIPELINE, run_pipeline, run_target_passes
from ir.graph import Graph
from ir.ops import QUANT_FORMATS, Embedding, PagedAttention
from ir.printer import print_graph
from ir.reference import DTYPE_NAMES, TORCH_DTYPES

log = logging.getLogger(__name__)
KILN_VERSION = "0.1.0"
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


@dataclass(frozen=True, slots=True)
class CompileOptions:
    dtype: str | None = None  # default: float32 on cpu, bfloat16 on cuda
    target: str = "cpu"
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    block_size: int = 16
    dump_ir: Path | None = None
    arch: str = "sm_90"  # cuda target: the GPU architecture kernels are built for
    tensor_parallel_size: int = 1  # > 1: one graph, weights sharded per rank (passes/shard.py)
    quantization: str | None = (
        None  # "int4" or "fp8": the projections' weights (passes/quantize.py)
    )
    group_size: int = 128  # int4: inputs sharing a scale and a zero

    def __post_init__(self) -> None:
        if self.target not in DEFAULT_DTYPE:
            raise ValueError(f"unknown target {self.target!r} (supported: cpu, cuda)")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.quantization not in (None, *QUANT_FORMATS):
            raise ValueError(f"unknown quantization {self.quantization!r} (supported: int4, fp8)")
        if self.quantization == "int4" and (self.group_size < 8 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8, got {self.group_size}")
        if not re.fullmatch(r"sm_\d{2,}", self.arch):
            raise ValueError(f"arch must look like sm_90, got {self.arch!r}")


@functools.cache
def compiler_digest() -> str:
    """Hash of the IR's and the compiler's source: what an artifact's graph was built by."""
    root = Path(__file__).parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(root / "ir").rglob("*.py"), *(root / "compiler").rglob("*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def is_current(path: Path) -> bool:
    """`path` holds an artifact this code would compile the same way (a cache hit): it
    reads, and the compiler that wrote it had this source."""
    try:
        return read_manifest(Path(path)).get("compiler") == compiler_digest()
    except ArtifactError:
        return False


def preflight(out: Path, options: CompileOptions) -> None:
    """What would fail at the end, checked before the minutes of work: the output path, and
    for the cuda target NVIDIA's compiler libraries."""
    check_output(Path(out).resolve())
    if options.target == "cuda":
        from codegen.toolchain import check_toolchain

        check_toolchain()


def compile_model(source: str, out: Path, options: CompileOptions = CompileOptions()) -> Path:
    preflight(out, options)
    dtype = options.dtype or DEFAULT_DTYPE[options.target]
    log.info("loading %s", source)
    return compile_loaded(load_model(source, TORCH_DTYPES[dtype]), out, options)


def compile_module(model: torch.nn.Module, out: Path, options: CompileOptions, **described):
    """Compile a model in memory: a transformers `…ForCausalLM` (`described` may name its
    tokenizer), or a custom architecture (compiler/frontend/module.py; `described`: its facts).
    """
    hf = isinstance(model, PreTrainedModel)
    if options.dtype is not None:  # .to() would cast a transformers model's rope buffers too
        how = "load it in that dtype (from_pretrained(..., dtype=...))" if hf else "cast it"
        raise ValueError(f"a model in memory compiles in its parameters' dtype: {how}")
    preflight(out, options)
    if hf:
        if set(described) - {"tokenizer"}:
            given = sorted(set(described) - {"tokenizer"})
            raise ValueError(f"a transformers model's configs give {given}: do not pass them")
        return compile_loaded(from_memory(model, **described), out, options)
    if options.max_model_len is None:
        raise ValueError("compiling a module needs max_model_len (the longest sequence served)")
    return compile_loaded(from_module(model, options.max_model_len, **described), out, options)


def compile_loaded(loaded: LoadedModel, out: Path, options: CompileOptions) -> Path:
    """Compile a model already in memory (its parameters' dtype is the artifact's)."""
    built = build(loaded, options)
    return write_artifact(
        out,
        built.manifest,
        built.graph,
        built.weights,
        loaded.tokenizer,
        loaded.facts.generation_defaults,
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
    if loaded.packed is not None and options.quantization is not None:
        raise ValueError(
            f"{loaded.source} is already quantized ({loaded.packed.method}): compile it "
            "without --quantization"
        )
    dtype = DTYPE_NAMES[next(loaded.model.parameters()).dtype]
    steps = tqdm(total=3, desc="kiln compile", unit="step")
    steps.set_postfix_str("trace")
    graph, params = trace_model(loaded.model, loaded.facts)
    before = graph.op_counts()
    if loaded.packed is not None:  # a GPTQ/AWQ checkpoint: its own int4 projections
        graph, params = use_packed(graph, params, loaded.packed.tensors)
    steps.update()
    steps.set_postfix_str("optimize")
    graph, params = run_pipeline(graph, params, dump_dir=options.dump_ir)
    architecture = architecture_summary(loaded.facts, graph)  # of the whole model
    graph, weights = _shard(graph, params, options)
    graph, weights, quantization = _quantize(graph, weights, options, loaded.packed)
    if options.target == "cuda":
        graph = run_target_passes(graph, CUDA_PASSES, options.dump_ir)
    log.info("ops before passes: %s", before)
    log.info("ops after passes:  %s", graph.op_counts())
    steps.update()
    steps.set_postfix_str("kernels" if options.target == "cuda" else "write")
    manifest = {
        "kiln_version": KILN_VERSION,
        "compiler": compiler_digest(),
        "source": loaded.source,
        "source_sha256": loaded.source_sha256,
        "architecture": architecture,
        "dtype": dtype,
        "quantization": quantization,
        "target": options.target,
        "max_model_len": options.max_model_len or loaded.facts.max_model_len,
        "block_size": options.block_size,
        "vocab_size": architecture["vocab_size"],
        # an id past the logits can never be sampled (and the loader would refuse it)
        "eos_token_ids": [i for i in loaded.facts.eos_token_ids if i < architecture["vocab_size"]],
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


def _quantize(graph, weights, options: CompileOptions, packed=None):
    """(graph, weights, the manifest's quantization entry): the projections' weights packed
    (each rank's alone), or all unchanged when no format is chosen (a pre-quantized
    checkpoint's entry names its method)."""
    if packed is not None:
        count = graph.op_counts().get("QuantLinear", 0)
        entry = {"format": "int4", "group_size": packed.group_size, "linears": count}
        return graph, weights, entry | {"method": packed.method}
    if options.quantization is None:
        return graph, weights, None
    group_size = options.group_size if options.quantization == "int4" else 0
    quantized = run_target_passes(
        graph, (quantize_linears(options.quantization, group_size),), options.dump_ir
    )
    if isinstance(weights, list):
        folded = [fold_constants(quantized, w) for w in weights]
        graph, weights = folded[0][0], [w for _, w in folded]
    else:
        graph, weights = fold_constants(quantized, weights)
    count = graph.op_counts().get("QuantLinear", 0)
    left = graph.op_counts().get("Linear", 0)
    log.info("%s: %d projections quantized, %d Linears kept", options.quantization, count, left)
    return (
        graph,
        weights,
        {"format": options.quantization, "group_size": group_size, "linears": count},
    )


def architecture_summary(facts, graph: Graph) -> dict:
    """The model's shape, read off the traced graph (its names from the source)."""
    attn = [n.op for n in graph.nodes if isinstance(n.op, PagedAttention)]
    embed = next((n.inputs[0] for n in graph.nodes if isinstance(n.op, Embedding)), None)
    head = lm_head(graph)
    return {
        "model_type": facts.model_type,
        "architectures": list(facts.architectures),
        "num_layers": len(attn),
        "hidden_size": None if embed is None else graph.type_of(embed).shape[1],
        "num_heads": attn[0].num_heads,
        "num_kv_heads": attn[0].num_kv_heads,
        "head_dim": attn[0].head_dim,
        "vocab_size": graph.type_of(graph.outputs[0]).shape[-1],
        "tie_word_embeddings": head is not None and head.inputs[1] == embed,
    }
