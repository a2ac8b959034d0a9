"""Random-weight instances of the real configs BENCH.md names (speed needs no real weights)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

CONFIGS = {
    "qwen3-0.6b": dict(
        model_type="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "phi-2": dict(
        model_type="phi",
        vocab_size=51200,
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        partial_rotary_factor=0.4,
        layer_norm_eps=1e-5,
        hidden_act="gelu_new",
        tie_word_embeddings=False,
    ),
    "pythia-410m": dict(
        model_type="gpt_neox",
        vocab_size=50304,
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        partial_rotary_factor=0.25,
        layer_norm_eps=1e-5,
        hidden_act="gelu",
        use_parallel_residual=True,
        tie_word_embeddings=False,
    ),
    "olmo-1b": dict(  # LayerNorm without affine parameters, float32 rope tables
        model_type="olmo",
        vocab_size=50304,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        pad_token_id=1,
        eos_token_id=50279,
        tie_word_embeddings=True,
    ),
}


def random_model(
    name: str, device: str = "cuda", dtype=torch.bfloat16, logit_scale: float = 1.0, **overrides
):
    """The named config (optionally with fewer layers etc.), random weights, eval mode.

    logit_scale multiplies the embedding and LM head: the first norm undoes it on the way in,
    so only the logits sharpen (clear argmaxes for parity tests; the body stays smooth).
    """
    config = AutoConfig.for_model(**{**CONFIGS[name], **overrides})
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for weight in {model.get_input_embeddings().weight, model.get_output_embeddings().weight}:
            weight.mul_(logit_scale)
    return model.eval()


def save_source(model, path) -> str:
    """Save as a local HF directory (config.json + safetensors), the compiler's input."""
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def in_memory_artifact(model, name: str, workdir, target: str = "cuda", **options):
    """Compile `model` without writing its weights: only the kernels go to `workdir` (the
    runtime loads cubins from files). Saves minutes of disk I/O for the 16 GB 8B shape."""
    from compiler.artifact import Artifact

    workdir = Path(workdir)
    built = _build(model, name, target=target, **options)
    for rel, data in built.files.items():
        (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
        (workdir / rel).write_bytes(data)
    # the files it wrote, as a written artifact's manifest lists them (the loader reads
    # only kernels listed there)
    files = {rel: hashlib.sha256(data).hexdigest() for rel, data in built.files.items()}
    return Artifact(workdir, {**built.manifest, "files": files}, built.graph, built.weights)


def sharded_artifact(model, name: str, out, tensor_parallel_size: int, target: str = "cuda"):
    """Compile `model` for `tensor_parallel_size` ranks and write the whole artifact to `out`
    (each other rank's process loads its weights from there); rank 0's are kept in host memory."""
    from compiler.artifact import Artifact, read_manifest, write_artifact

    built = _build(model, name, target=target, tensor_parallel_size=tensor_parallel_size)
    write_artifact(Path(out), built.manifest, built.graph, built.weights, extra_files=built.files)
    weights = {k: v.cpu() for k, v in built.weights[0].items()}  # as if loaded from `out`
    # the manifest as written, with the files it lists (the loader reads only kernels there)
    return Artifact(Path(out), read_manifest(Path(out)), built.graph, weights)


def _build(model, name: str, **options):
    """The artifact's contents, compiled from the model in memory."""
    from compiler.compile import CompileOptions, build
    from compiler.frontend.loader import from_transformers

    return build(from_transformers(model, None, f"random:{name}", "-"), CompileOptions(**options))
