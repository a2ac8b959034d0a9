"""Kiln's attention as one torch custom op, plugged into transformers' attention registry.

`torch.export` keeps a custom op as a single node, so each layer's attention reaches the
converter as one `kiln::attention` call however the architecture computes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

ATTN_IMPLEMENTATION = "kiln"


@torch.library.custom_op("kiln::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer: int,
    scale: float,
    sliding_window: int,
    softcap: float,
) -> torch.Tensor:
    """Causal attention of one sequence: q [1, H, T, D], k/v [1, KVH, T, D] -> [1, T, H, D].

    The eager body only serves to run the exported program; the compiled graph replaces it
    with PagedAttention. sliding_window <= 0 and softcap <= 0 mean off.
    """
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    n = q.shape[2]
    pos = torch.arange(n, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if sliding_window > 0:
        allowed &= pos[:, None] - pos[None, :] < sliding_window
    probs = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs @ v.float()).to(q.dtype).transpose(1, 2).contiguous()


@attention.register_fake
def _(q, k, v, layer, scale, sliding_window, softcap):
    return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])


def kiln_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention-interface entry: returns (output [1, T, H, D], no weights)."""
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None) or 0
    softcap = kwargs.get("softcap") or 0.0
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = attention(query, key, value, module.layer_idx, float(scale), int(window), float(softcap))
    return out, None


def _no_mask(*args, **kwargs):
    return None  # causality and windows are the attention op's job, not a mask tensor's


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, kiln_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
