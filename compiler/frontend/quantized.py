"""Pre-quantized 4-bit checkpoints (GPTQ, AWQ) in a local HF directory: the float module of
the config (its projections' weights left uninitialized: tracing reads no values) with every
other tensor loaded, and each projection's packed tensors converted to Kiln's int4 layout
(ir/quant.py), exactly: codes and zeros kept, scales cast to the model's dtype.
passes/prequantized.py then puts them in the traced graph.

The checkpoint layouts, as checked against AutoGPTQ/AutoGPTQ
auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py (pack, forward), vllm-project/vllm
vllm/model_executor/layers/quantization/gptq.py (g_idx, zeros + 1) and casper-hansen/AutoAWQ
awq/modules/linear/gemm.py (from_linear), awq/utils/packing_utils.py (dequantize_gemm), with
K inputs, N outputs and G = K / group_size groups:
- GPTQ (checkpoint format "gptq", v1): qweight int32 [K/8, N], code k of output n in bits
  4*(k%8) of word [k//8, n]; qzeros int32 [G, N/8] packed along N the same way, holding
  zero - 1 (dequantization adds the 1 back to the masked nibble); scales [G, N];
  g_idx [K] the group of each input (k // group_size unless act-order permuted it).
- AWQ (version "gemm"): qweight int32 [K, N/8] packed along N, nibble i of a word holding
  column AWQ_ORDER[i] of its eight; qzeros [G, N/8] likewise, the zeros themselves;
  scales [G, N].
Both dequantize as w[n, k] = (q - zero) * scale over k's group.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig
from transformers.initialization import no_init_weights

from compiler.frontend.loader import (
    LoadedModel,
    UnsupportedModelError,
    check_config,
    from_transformers,
    load_tokenizer,
)
from ir import ops
from ir.quant import pack_int4, unpack_int4
from ir.reference import DTYPE_NAMES
from ir.types import TensorType

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i]
AWQ_SHIFTS = torch.tensor([4 * AWQ_ORDER.index(j) for j in range(8)], dtype=torch.int32)
PACKED = ("qweight", "qzeros", "scales", "g_idx")  # a quantized projection's tensors
SUPPORTED = (
    "GPTQ (bits 4, checkpoint_format gptq, no act-order permutation) and AWQ (bits 4, "
    "version gemm, zero_point)"
)


@dataclass(frozen=True, slots=True)
class PackedLinears:
    """A checkpoint's quantized projections in Kiln's int4 layout."""

    method: str  # "gptq" or "awq"
    group_size: int  # the config's (-1: one group per output row)
    # the traced name of the float weight each replaces -> (qweight, scales, zeros)
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def check_quantization(config: dict) -> tuple[str, int]:
    """(method, group_size) of a supported quantization_config, else UnsupportedModelError."""
    method = str(config.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise UnsupportedModelError(f"quantization method {method!r}: kiln reads {SUPPORTED}")
    if config.get("bits") != 4:
        raise UnsupportedModelError(f"{method}: {config.get('bits')}-bit weights (4-bit only)")
    if method == "gptq":
        fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
        if fmt != "gptq" or config.get("is_marlin_format"):
            fmt = "marlin" if config.get("is_marlin_format") else fmt
            raise UnsupportedModelError(f"gptq: checkpoint format {fmt!r} (the v1 'gptq' only)")
        if config.get("dynamic"):
            raise UnsupportedModelError("gptq: per-module overrides ('dynamic')")
    else:
        version = str(config.get("version") or config.get("format") or "gemm").lower()
        if version != "gemm":
            raise UnsupportedModelError(f"awq: version {version!r} (the 'gemm' layout only)")
        if not config.get("zero_point", True):
            raise UnsupportedModelError("awq: zero_point false (asymmetric with zeros only)")
    group = config.get("group_size", 128)
    if not isinstance(group, int) or (group <= 0 and group != -1):
        raise UnsupportedModelError(f"{method}: group_size {group!r}")
    return method, group


def load_quantized(
    source: str, directory: Path, config, dtype: torch.dtype, source_sha256: str
) -> LoadedModel:
    """The LoadedModel of a GPTQ or AWQ directory, its `packed` projections set."""
    qconfig = config.quantization_config
    qconfig = qconfig if isinstance(qconfig, dict) else qconfig.to_dict()
    method, group = check_quantization(qconfig)
    config = copy.deepcopy(config)
    del config.quantization_config
    check_config(config)
    with no_init_weights():  # the projections' weights stay empty: only their shapes count
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    tensors = _read_safetensors(directory)
    weights = dict(model.named_parameters())  # tied weights once
    packed = {}
    for prefix in sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")):
        w = weights.get(f"{prefix}.weight")
        if w is None or w.dim() != 2:
            raise UnsupportedModelError(f"{source}: {prefix} is quantized but no projection")
        parts = {p: tensors.pop(f"{prefix}.{p}", None) for p in PACKED}
        packed[f"{prefix}.weight"] = _convert(method, group, prefix, w, parts)
        bias = tensors.get(f"{prefix}.bias")
        if f"{prefix}.bias" not in weights and bias is not None:
            if bias.any():  # GPTQ-for-LLaMa saved all-zero biases of bias-free projections
                raise UnsupportedModelError(f"{source}: {prefix} has a bias its model lacks")
            del tensors[f"{prefix}.bias"]
    missing = set(weights) - set(tensors) - set(packed)
    if missing:
        raise UnsupportedModelError(f"{source}: the checkpoint lacks {sorted(missing)[:5]}")
    loose = set(tensors) - set(model.state_dict())
    if loose:
        raise UnsupportedModelError(f"{source}: unexpected tensors {sorted(loose)[:5]}")
    model.load_state_dict(tensors, strict=False)  # cast to the model's dtype
    tokenizer = load_tokenizer(directory, {})
    loaded = from_transformers(model.eval(), tokenizer, source, source_sha256)
    return replace(loaded, packed=PackedLinears(method, group, packed))


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update((k, f.get_tensor(k)) for k in f.keys())  # noqa: SIM118
    return tensors


def _convert(method: str, group: int, prefix: str, w: torch.Tensor, parts: dict):
    """(qweight, scales, zeros) in Kiln's layout from a projection's checkpoint tensors."""
    n, k = w.shape
    group = k if group == -1 else group
    try:
        ops.check_quant("int4", group, TensorType((n, k), DTYPE_NAMES[w.dtype]))
    except ValueError as e:
        raise UnsupportedModelError(f"{method}: {prefix}: {e}") from None
    g = k // group
    qweight, qzeros, scales, g_idx = (parts[p] for p in PACKED)
    gptq = method == "gptq"
    shapes = {
        "qweight": (k // 8, n) if gptq else (k, n // 8),
        "qzeros": (g, n // 8),
        "scales": (g, n),
    }
    for name, shape in shapes.items():
        t = parts[name]
        packed_ints = name != "scales"  # scales are floats, the rest int32 words
        if t is None or tuple(t.shape) != shape or packed_ints != (t.dtype == torch.int32):
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise UnsupportedModelError(f"{method}: {prefix}.{name} is {got}, expected {shape}")
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(k) // group):
        raise UnsupportedModelError(
            f"{method}: {prefix}: act-order (desc_act) with a permuted g_idx (groups of "
            "consecutive inputs only)"
        )
    if gptq:  # codes already run along K, eight a word, lowest first: Kiln's words
        qweight, zeros = qweight.T.contiguous(), unpack_int4(qzeros) + 1
    else:
        qweight, zeros = pack_int4(_unpack_awq(qweight).T), _unpack_awq(qzeros)
    return qweight, scales.T.contiguous().to(w.dtype), zeros.T.contiguous().to(w.dtype)


def _unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, C / 8] packed along C in AWQ's order -> codes [R, C]."""
    return ((words[..., None] >> AWQ_SHIFTS) & 15).reshape(words.shape[0], -1)
