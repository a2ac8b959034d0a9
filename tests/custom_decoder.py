"""A decoder written from scratch (no transformers class, no config) for the custom-module
tests: Llama-like blocks in kiln's flat-batch convention, attention through kiln.attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import kiln

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN = 96, 48, 6, 2, 8, 80


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


def rotate(x, cos, sin):
    """Rotate-half rope (Llama's); cos/sin [T, 1, D], each frequency twice."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def rotate_pairs(x, cos, sin):
    """Interleaved rope (GPT-J's): pairs (x0, x1), (x2, x3), ...; cos/sin [T, 1, D/2]."""
    even, odd = x[..., ::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


class Block(nn.Module):
    """Pre-norm attention (GQA, rotate-half rope) and a SwiGLU MLP, with residuals."""

    def __init__(self, layer: int, rope=rotate) -> None:
        super().__init__()
        self.layer, self.rope = layer, rope
        self.attn_norm, self.mlp_norm = RMSNorm(HIDDEN), RMSNorm(HIDDEN)
        self.q = nn.Linear(HIDDEN, HEADS * HEAD_DIM, bias=False)
        self.k = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.v = nn.Linear(HIDDEN, KV_HEADS * HEAD_DIM, bias=False)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN, bias=False)
        self.gate = nn.Linear(HIDDEN, FFN, bias=False)
        self.up = nn.Linear(HIDDEN, FFN, bias=False)
        self.down = nn.Linear(FFN, HIDDEN, bias=False)

    def forward(self, x, cos, sin):
        h = self.attn_norm(x)
        q = self.rope(self.q(h).view(-1, HEADS, HEAD_DIM), cos, sin)
        k = self.rope(self.k(h).view(-1, KV_HEADS, HEAD_DIM), cos, sin)
        v = self.v(h).view(-1, KV_HEADS, HEAD_DIM)
        x = x + self.o(kiln.attention(q, k, v, self.layer).reshape(-1, HEADS * HEAD_DIM))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyDecoder(nn.Module):
    """A decoder written from scratch: no transformers class, no config."""

    def __init__(
        self,
        layers: int = 3,
        vocab: int = VOCAB,
        interleaved: bool = False,
        logit_softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.interleaved, self.logit_softcap = interleaved, logit_softcap
        self.embed = nn.Embedding(vocab, HIDDEN)
        rope = rotate_pairs if interleaved else rotate
        self.blocks = nn.ModuleList(Block(i, rope) for i in range(layers))
        self.norm = RMSNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, vocab, bias=False)
        inv_freq = 1.0 / 10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, token_ids, positions, logits_indices):
        angles = positions[:, None].float() * self.inv_freq
        if not self.interleaved:
            angles = torch.cat((angles, angles), -1)
        angles = angles[:, None, :]  # every head
        x = self.embed(token_ids)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x)[logits_indices])
        if self.logit_softcap is None:
            return logits
        return self.logit_softcap * torch.tanh(logits / self.logit_softcap)  # Gemma-2's


def decoder(seed: int = 0, cls: type[nn.Module] = TinyDecoder, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = cls(**kwargs)
    with torch.no_grad():  # sharper logits than nn's default init: fewer near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def eager_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The module's own greedy continuation, one full forward a token (no cache)."""
    ids, device = list(prompt), next(model.parameters()).device
    with torch.no_grad():
        for _ in range(n):
            t = torch.tensor(ids, device=device)
            last = torch.tensor([len(ids) - 1], device=device)
            logits = model(t, torch.arange(len(ids), device=device), last)
            ids.append(int(logits[0].argmax()))
    return ids[len(prompt) :]


class ParallelBlock(nn.Module):
    """GPT-J-like: one LayerNorm feeding attention (q/k/v from one Linear, split by the
    module) and a GELU MLP side by side, both added to the residual."""

    def __init__(self, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.norm = nn.LayerNorm(HIDDEN)
        self.qkv = nn.Linear(HIDDEN, 3 * HEADS * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, HIDDEN)
        self.fc, self.proj = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (t.view(-1, HEADS, HEAD_DIM) for t in self.qkv(h).split(HEADS * HEAD_DIM, -1))
        a = kiln.attention(q, k, v, self.layer).reshape(-1, HEADS * HEAD_DIM)
        return x + self.o(a) + self.proj(F.gelu(self.fc(h), approximate="tanh"))


class ParallelDecoder(nn.Module):
    """Learned absolute positions, no rope, LayerNorm, parallel residual, biases."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.embed, self.pos = nn.Embedding(VOCAB, HIDDEN), nn.Embedding(128, HIDDEN)
        self.blocks = nn.ModuleList(ParallelBlock(i) for i in range(layers))
        self.norm = nn.LayerNorm(HIDDEN)
        self.head = nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, token_ids, positions, logits_indices):
        x = self.embed(token_ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[logits_indices])
