"""Tiny Gemma, Gemma2 and Gemma3 (text) models whose every feature bites (windows shorter
than the prompts, small soft-caps, a scale that is not head_dim's, random norm weights),
shared by the CPU and the GPU tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# fp32 end to end; the only differences are summation orders (matmul blocking, softmax):
# ~3e-6 seen on logits of magnitude ~5
LOGITS_ATOL = 2e-4
WINDOW = 8  # shorter than most prompts below, so the sliding layers' masks bite
TINY = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    # Gemma ties its LM head to the embedding; with random weights a tied head mostly echoes
    # the last token (its embedding, scaled by sqrt(hidden), dominates the residual), which
    # makes greedy decoding a weak check: untied here, tied in the logits test
    tie_word_embeddings=False,
)
LAYER_TYPES = ["sliding_attention", "full_attention"]
GEMMA = {
    "gemma": dict(model_type="gemma"),
    "gemma2": dict(
        model_type="gemma2",
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        query_pre_attn_scalar=24,  # not head_dim: the scale is 24**-0.5, not 16**-0.5
        attn_logit_softcapping=3.0,  # small enough to bite on these scores
        final_logit_softcapping=4.0,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text",
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        query_pre_attn_scalar=24,
        rope_parameters={  # the local (sliding) layers' rope has a base of its own
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}


def gemma_model(family: str, seed: int = 0, **config) -> torch.nn.Module:
    """A family's tiny model; `config` overrides its config."""
    config = AutoConfig.for_model(**{**TINY, **GEMMA[family], **config})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm weights too: Gemma's start at 0 (a scale of 1 + 0)
        for p in model.parameters():
            p.normal_(0, 0.15 if p.dim() == 2 else 0.3)
    return model


def reference(model) -> torch.nn.Module:
    """transformers' eager attention: soft-capping and sliding windows as Gemma defines them."""
    model.config._attn_implementation = "eager"
    return model
