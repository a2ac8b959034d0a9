"""Torch reference of every op: the CPU executor and the oracle for kernels and passes."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ir import ops
from ir.quant import dequantize, quantize
from ir.types import TensorType

REFERENCE: dict[type, Callable] = {}

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}

UNARY = {
    "neg": torch.neg,
    "rsqrt": torch.rsqrt,
    "sqrt": torch.sqrt,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "cos": torch.cos,
    "sin": torch.sin,
    "exp": torch.exp,
    "tanh": torch.tanh,
}
BINARY = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow}


@dataclass(frozen=True, slots=True)
class RefContext:
    """Runtime state the ops see: symbol sizes and, for attention, the paged KV cache.

    kv_caches[layer] = (k, v), each [num_blocks, block_size, num_kv_heads, head_dim].
    slot_mapping[T]: cache slot of each new token; query_start[B+1]: token offsets of the
    sequences in the flat batch; context_lens[B]: cached + new tokens of each sequence;
    block_tables[B, max_blocks]: each sequence's blocks in order; tp_group: the
    tensor-parallel process group AllReduce sums over (None: a single rank).
    """

    sizes: dict[str, int]
    kv_caches: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    slot_mapping: torch.Tensor | None = None
    query_start: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    tp_group: dist.ProcessGroup | None = None
    memo: dict = field(default_factory=dict, compare=False)  # per-step values shared by layers


def reference(op_type: type) -> Callable:
    def register(fn: Callable) -> Callable:
        if op_type in REFERENCE:
            raise ValueError(f"reference for {op_type.__name__} registered twice")
        REFERENCE[op_type] = fn
        return fn

    return register


def run_op(op, ctx: RefContext, *args) -> tuple[torch.Tensor, ...]:
    out = REFERENCE[type(op)](op, ctx, *args)
    return out if isinstance(out, tuple) else (out,)


def concrete_shape(t: TensorType, sizes: dict[str, int]) -> tuple[int, ...]:
    return tuple(sizes[d] if isinstance(d, str) else d for d in t.shape)


@reference(ops.Embedding)
def _embedding(op, ctx, weight, ids):
    return F.embedding(ids, weight)


@reference(ops.Linear)
def _linear(op, ctx, x, w, bias=None):
    return F.linear(x, w, bias)


@reference(ops.QuantizeWeight)
def _quantize_weight(op, ctx, w):
    return quantize(w, op.format, op.group_size)


@reference(ops.QuantLinear)
def _quant_linear(op, ctx, x, qweight, scales, *rest):
    zeros, bias = (rest[0], rest[1:]) if op.format == "int4" else (None, rest)
    w = dequantize(op.format, op.group_size, qweight, scales, zeros, x.dtype)
    return F.linear(x, w, *bias)


@reference(ops.Unary)
def _unary(op, ctx, x):
    return UNARY[op.fn](x)


@reference(ops.Binary)
def _binary(op, ctx, a, b):
    return BINARY[op.fn](a, b)


@reference(ops.BinaryScalar)
def _binary_scalar(op, ctx, x):
    fn = BINARY[op.fn]
    if op.scalar_first:
        return fn(torch.tensor(op.scalar, dtype=x.dtype), x)
    return fn(x, op.scalar)


@reference(ops.Cast)
def _cast(op, ctx, x):
    return x.to(TORCH_DTYPES[op.dtype])


@reference(ops.Mean)
def _mean(op, ctx, x):
    return x.mean(dim=op.dims, keepdim=op.keepdim)


@reference(ops.Sum)
def _sum(op, ctx, x):
    return x.sum(dim=op.dims, keepdim=op.keepdim)


@reference(ops.Reshape)
def _reshape(op, ctx, x):
    return x.reshape([ctx.sizes[d] if isinstance(d, str) else d for d in op.shape])


@reference(ops.Transpose)
def _transpose(op, ctx, x):
    return x.transpose(op.dim0, op.dim1)


@reference(ops.Slice)
def _slice(op, ctx, x):
    index = [slice(None)] * x.dim()
    index[op.dim] = slice(op.start, op.end, op.step)
    return x[tuple(index)]


@reference(ops.Concat)
def _concat(op, ctx, *xs):
    return torch.cat(xs, dim=op.dim)


@reference(ops.GatherLastTokens)
def _gather(op, ctx, x, indices):
    return x.index_select(op.dim, indices)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@reference(ops.RMSNorm)
def _rmsnorm(op, ctx, x, weight):
    return rms_norm(x, weight, op.eps)


@reference(ops.LayerNorm)
def _layernorm(op, ctx, x, weight, bias=None):
    b = None if bias is None else bias.float()
    y = F.layer_norm(x.float(), x.shape[-1:], weight.float(), b, op.eps)
    return y.to(x.dtype)


@reference(ops.AddRMSNorm)
def _add_rmsnorm(op, ctx, x, residual, weight):
    s = x + residual
    return rms_norm(s, weight, op.eps), s


@reference(ops.NormLinear)
def _norm_linear(op, ctx, x, residual, norm_weight, weight):
    y, s = _add_rmsnorm(op, ctx, x, residual, norm_weight)
    h = F.linear(y, weight)
    if op.act == "silu_mul":
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
    return h, s


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@reference(ops.Rope)
def _rope(op, ctx, x, cos, sin):
    return rope(x, cos, sin)


@reference(ops.AllReduce)
def _all_reduce(op, ctx, x):
    if ctx.tp_group is None:
        return x
    out = x.clone()  # inputs stay untouched, as with every other op
    dist.all_reduce(out, group=ctx.tp_group)
    return out


@reference(ops.SiluMul)
def _silu_mul(op, ctx, gate, up):
    return F.silu(gate) * up


def eval_expr(expr: tuple, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    head = expr[0]
    if head == "arg":
        return args[expr[1]].float()
    if head == "const":
        return torch.tensor(expr[1], dtype=torch.float32)
    if head == "cast":  # rounding through a narrower dtype is part of the semantics
        return eval_expr(expr[2], args).to(TORCH_DTYPES[expr[1]]).float()
    if head in UNARY:
        return UNARY[head](eval_expr(expr[1], args))
    return BINARY[head](eval_expr(expr[1], args), eval_expr(expr[2], args))


@reference(ops.FusedElementwise)
def _fused(op, ctx, *args):
    return eval_expr(op.expr, args).to(TORCH_DTYPES[op.dtype])


@reference(ops.PagedAttention)
def _paged_attention(op, ctx, q, k, v, cos=None, sin=None):
    if op.layout == "bhtd":  # [1, H, T, D] -> [T, H, D]
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
    else:
        q, k, v = q[0], k[0], v[0]
    if op.rope:
        c, s = cos[0][:, None, :], sin[0][:, None, :]  # [T, 1, R]
        r = op.rotary_dim or op.head_dim
        q, k = (torch.cat([rope(t[..., :r], c, s).to(t.dtype), t[..., r:]], -1) for t in (q, k))
    k_cache, v_cache = ctx.kv_caches[op.layer]
    write_kv(k_cache, v_cache, k, v, ctx.slot_mapping)
    plan = ctx.memo.get(("attention", op.sliding_window))
    if plan is None:
        plan = ctx.memo[("attention", op.sliding_window)] = plan_attention(
            ctx, op, k_cache.shape[1]
        )
    out = torch.empty_like(q)
    if plan.rows is not None:  # one batched call for every single-token query
        out[plan.rows] = attend_decodes(op, q[plan.rows], k_cache, v_cache, plan)
    for b, start, n in plan.prefills:
        out[start : start + n] = attend(op, q[start : start + n], k_cache, v_cache, ctx, b)
    return out[None]


@dataclass(frozen=True, slots=True)
class AttentionPlan:
    """How one step's sequences are attended (the same for every layer of the step)."""

    rows: torch.Tensor | None  # [S] token rows of the single-token queries
    slots: torch.Tensor | None  # [S, L] cache slot of each of their context positions
    allowed: torch.Tensor | None  # [S, L] valid positions; None when all are
    prefills: list[tuple[int, int, int]]  # (sequence, first token row, tokens) of the others


def plan_attention(ctx: RefContext, op, block_size: int) -> AttentionPlan:
    starts = ctx.query_start.tolist()
    counts = [e - s for s, e in itertools.pairwise(starts)]
    decodes = [b for b, n in enumerate(counts) if n == 1]
    prefills = [(b, starts[b], n) for b, n in enumerate(counts) if n > 1]
    if not decodes:
        return AttentionPlan(None, None, None, prefills)
    lens = ctx.context_lens[decodes].long()
    width = int(lens.max())
    pos = torch.arange(width, device=lens.device)
    tables = ctx.block_tables[decodes][:, : math.ceil(width / block_size)].long()
    slots = tables[:, pos // block_size] * block_size + pos % block_size
    allowed = pos[None, :] < lens[:, None]
    if op.sliding_window:
        allowed &= (lens[:, None] - 1) - pos[None, :] < op.sliding_window
    rows = ctx.query_start[decodes].long()
    return AttentionPlan(rows, slots, None if bool(allowed.all()) else allowed, prefills)


def write_kv(k_cache, v_cache, k, v, slot_mapping) -> None:
    num_kv_heads, head_dim = k_cache.shape[2:]
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = v.to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` cached tokens of one sequence: [length, KVH, D]."""
    block_size = cache.shape[1]
    blocks = block_table[: math.ceil(length / block_size)]
    return cache[blocks].flatten(0, 1)[:length]


def attend_decodes(op, q, k_cache, v_cache, plan: AttentionPlan) -> torch.Tensor:
    """Attention of one new token per sequence q [S, H, D] over each one's cached context."""
    kvh, dim = k_cache.shape[2:]
    keys = k_cache.view(-1, kvh, dim)[plan.slots]  # [S, L, KVH, D]
    values = v_cache.view(-1, kvh, dim)[plan.slots]
    mask = None
    if plan.allowed is not None:  # padding slots of shorter contexts may hold anything
        values = values.masked_fill(~plan.allowed[:, :, None, None], 0.0)
        mask = plan.allowed[:, None, None]
    out = attention_core(op, q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), mask)
    return out[:, :, 0].to(q.dtype)


def attend(op, q, k_cache, v_cache, ctx: RefContext, b: int) -> torch.Tensor:
    """Causal attention of one sequence's new tokens q [n, H, D] over its cached context."""
    n, length = q.shape[0], int(ctx.context_lens[b])
    keys = gather_context(k_cache, ctx.block_tables[b], length)  # [L, KVH, D]
    values = gather_context(v_cache, ctx.block_tables[b], length)
    q_pos = torch.arange(length - n, length, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    allowed = k_pos <= q_pos
    if op.sliding_window:
        allowed &= q_pos - k_pos < op.sliding_window
    out = attention_core(
        op, q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), allowed
    )
    return out.transpose(0, 1).to(q.dtype)


def attention_core(op, q, k, v, allowed) -> torch.Tensor:
    """softmax(q k^T * scale (soft-capped), masked) v in float32; q [..., H, n, D], k/v
    [..., KVH, L, D], `allowed` broadcastable to [..., H, n, L]."""
    q, k, v = q.float(), k.float(), v.float()
    if not op.softcap:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=op.scale, enable_gqa=True
        )
    group = op.num_heads // op.num_kv_heads
    k, v = k.repeat_interleave(group, -3), v.repeat_interleave(group, -3)
    scores = q @ k.transpose(-1, -2) * op.scale
    scores = torch.tanh(scores / op.softcap) * op.softcap
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


def evaluate(graph, inputs: dict[str, torch.Tensor], ctx: RefContext) -> list[torch.Tensor]:
    """Run `graph` on named input tensors (params included); returns its outputs."""
    env = dict(inputs)
    for node in graph.nodes:
        results = run_op(node.op, ctx, *(env[n] if n else None for n in node.inputs))
        env.update((v.name, r) for v, r in zip(node.outputs, results, strict=True))
    return [env[n] for n in graph.outputs]
