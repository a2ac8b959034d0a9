"""Custom architectures: a plain `torch.nn.Module` in kiln's flat-batch calling convention.

The module's `forward(token_ids [T], positions [T], logits_indices [B]) -> logits [B, vocab]`
sees every sequence of a batch flattened into one token dimension (T symbolic, any size >= 2
when traced) and returns the logits of the rows `logits_indices` picks. Each layer's attention
calls `attention` below: the traced op becomes the paged-attention node, so the module never
sees a KV cache. Everything else (norms, rope, MLPs, embeddings) is ordinary torch code that
the frontend converts and the passes optimize as they do a transformers model's.
"""

from __future__ import annotations

import torch

from compiler.frontend import attention as attention_op
from compiler.frontend.loader import (
    GENERATION_KEYS,
    LoadedModel,
    ModelFacts,
    UnsupportedModelError,
    as_tokenizer,
    state_sha256,
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    scale: float | None = None,
    sliding_window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of layer `layer` over each sequence's cached and new tokens.

    q [T, H, D], k and v [T, KVH, D] (H a multiple of KVH: GQA, MQA and MHA) -> [T, H, D].
    `scale` defaults to D**-0.5; `sliding_window` and `softcap` <= 0 mean off. Eagerly (one
    sequence, no cache) it is plain causal attention, so the module can be run and checked
    in torch before it is compiled.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"attention takes [T, heads, head_dim] tensors, got q {tuple(q.shape)}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = attention_op.attention(  # [1, heads, T, D], as transformers hands them over
        q[None].transpose(1, 2),
        k[None].transpose(1, 2),
        v[None].transpose(1, 2),
        layer,
        float(scale),
        int(sliding_window),
        float(softcap),
    )
    return out[0]


def from_module(
    model: torch.nn.Module,
    max_model_len: int,
    tokenizer=None,
    eos_token_ids=(),
    name: str | None = None,
    generation_defaults: dict | None = None,
) -> LoadedModel:
    """A custom module as the compiler's input; its parameters' dtype is the artifact's.

    `tokenizer`: a transformers tokenizer, a directory holding one, or None (the artifact then
    takes token ids only). `eos_token_ids`: the ids that end a sequence (default: the
    tokenizer's EOS). `generation_defaults`: sampling defaults (temperature, top_p, top_k,
    min_p, repetition_penalty).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    dtypes = {p.dtype for p in model.parameters()}
    if len(dtypes) != 1:
        found = sorted(map(str, dtypes))
        raise UnsupportedModelError(
            f"{type(model).__name__}: parameters of one dtype expected, got {found}"
        )
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    unknown = set(generation_defaults or {}) - set(GENERATION_KEYS)
    if unknown:
        raise ValueError(f"unknown generation defaults {sorted(unknown)}; known: {GENERATION_KEYS}")
    tokenizer = as_tokenizer(tokenizer)
    eos = {int(i) for i in eos_token_ids}
    if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    cls = type(model).__name__
    facts = ModelFacts(
        model_type=name or cls,
        architectures=(cls,),
        max_model_len=max_model_len,
        eos_token_ids=tuple(sorted(eos)),
        generation_defaults=dict(generation_defaults or {}),
        hf_forward=False,
    )
    return LoadedModel(model.eval(), tokenizer, f"module:{cls}", state_sha256(model), facts)
