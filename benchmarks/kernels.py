"""`kiln bench kernels`: every variant of a kernel on the same inputs (BENCH.md K1 to K4;
K1m: K1 at W1's mixed context lengths; K1s: at W3's lone sequence): the Numba kernels, the
torch reference, and for attention torch SDPA and flex attention (checked against SDPA).

Each variant's GPU time comes from replaying its calls captured in a CUDA graph, so no
variant is charged its host launch cost. Prints achieved bandwidth or FLOP/s and the
fraction of the H200 ceiling, writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import math
import random

import torch
import torch.nn.functional as F

from benchmarks.common import save, table
from benchmarks.kernel_timing import BF16_FLOPS, DEFAULTS, bw_row, gpu_time, numba_op
from benchmarks.quant_kernels import k2
from codegen.registry import BuildConstants
from ir import ops
from ir.reference import REFERENCE, RefContext, rms_norm
from ir.types import TensorType


def k3(rows: int = 8192, hidden: int = 4096) -> list[dict]:
    x, r = (torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16) for _ in "xr")
    w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16)
    out, total = torch.empty_like(x), torch.empty_like(x)
    t = TensorType((rows, hidden), "bfloat16")
    op = ops.AddRMSNorm(1e-6)
    variants = {
        "numba add_rmsnorm": numba_op(
            op,
            (t, t, TensorType((hidden,), "bfloat16")),
            {"in0": x, "in1": r, "in2": w, "out0": out, "out1": total},
            {"T": rows},
        ),
        "torch reference": lambda: rms_norm(x + r, w, 1e-6),
    }
    moved = 4 * x.nbytes  # read x and r, write the norm and the sum
    return [bw_row("K3 add+rmsnorm", name, gpu_time(fn), moved) for name, fn in variants.items()]


@functools.cache
def _compiled_flex():
    """flex_attention compiled once, on first use (importing this module stays cheap)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_causal(new: int, cached: int, device: str | torch.device, compiled: bool = True):
    """attend(q, k, v) by flex attention for `new` query tokens per sequence after `cached`:
    the query at new-token index i sits at position cached + i and sees keys 0..cached + i.
    q is (seqs, heads, new, dim), k and v (seqs, kv heads, cached + new, dim), heads grouped
    over kv heads (GQA). The block mask is built here, once; uncompiled runs eagerly (CPU)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= cached + q_idx

    block_mask = create_block_mask(causal, None, None, new, cached + new, device=device)
    attend = _compiled_flex() if compiled else flex_attention
    return lambda q, k, v: attend(q, k, v, block_mask=block_mask, enable_gqa=True)


def _paged(seqs: int, new: int, cached: int, heads=32, kv_heads=8, dim=128, block=16):
    """Caches with `cached` tokens per sequence plus room for `new`, and the batch fields."""
    ctx = cached + new
    per_seq = math.ceil(ctx / block)
    blocks = torch.randperm(seqs * per_seq, device="cuda", dtype=torch.int32)
    tables = blocks.view(seqs, per_seq)
    shape = (seqs * per_seq, block, kv_heads, dim)
    k_cache, v_cache = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in "kv")
    pos = torch.arange(cached, ctx, device="cuda")
    slots = (tables[:, pos // block].long() * block + (pos % block)).reshape(-1)
    q = torch.randn(1, seqs * new, heads, dim, device="cuda", dtype=torch.bfloat16)
    k, v = (
        torch.randn(1, seqs * new, kv_heads, dim, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    fields = {
        "slot_mapping": slots,
        "query_start": torch.arange(0, seqs * new + 1, new, device="cuda", dtype=torch.int32),
        "context_lens": torch.full((seqs,), ctx, device="cuda", dtype=torch.int32),
        "block_tables": tables,
    }
    op = ops.PagedAttention(0, heads, kv_heads, dim, dim**-0.5, layout="bthd")
    return op, q, k, v, k_cache, v_cache, fields


def _attention_variants(seqs, new, cached, consts=(DEFAULTS,)):
    """Every variant on the same inputs; the split-K kernel once per set of constants."""
    op, q, k, v, kc, vc, fields = _paged(seqs, new, cached)
    tokens, ctx = seqs * new, cached + new
    out = torch.empty_like(q)
    types = tuple(TensorType(tuple(t.shape), "bfloat16") for t in (q, k, v))
    sizes = {"T": tokens, "B": seqs, "seqs": seqs, "max_context_len": ctx, "max_query_len": new}
    tensors = {"in0": q, "in1": k, "in2": v, "out0": out, "k_cache": kc, "v_cache": vc, **fields}
    ref_ctx = RefContext(sizes, ((kc, vc),), **fields)

    def gather(cache):  # each sequence's context from its blocks, (seqs, kv heads, ctx, dim)
        return cache[fields["block_tables"].long()].flatten(1, 2)[:, :ctx].transpose(1, 2)

    # a dense, pre-gathered copy of each sequence's context: what a non-paged library reads
    dense_k, dense_v = gather(kc).contiguous(), gather(vc).contiguous()
    qs = q[0].view(seqs, new, *q.shape[2:]).transpose(1, 2)
    mask = (
        torch.arange(ctx, device="cuda")[None, :]
        <= torch.arange(cached, ctx, device="cuda")[:, None]
    )
    flex = flex_causal(new, cached, q.device)

    def sdpa_dense():
        return F.scaled_dot_product_attention(qs, dense_k, dense_v, attn_mask=mask, enable_gqa=True)

    def sdpa_gather():
        return F.scaled_dot_product_attention(
            qs, gather(kc), gather(vc), attn_mask=mask, enable_gqa=True
        )

    def flex_dense():
        return flex(qs, dense_k, dense_v)

    def flex_gather():
        return flex(qs, gather(kc), gather(vc))

    got, want = flex_dense(), sdpa_dense()  # also compiles flex before any timing
    if not torch.allclose(got, want, atol=2e-2, rtol=2e-2):
        worst = (got.float() - want.float()).abs().max().item()
        raise RuntimeError(f"flex_attention differs from sdpa by up to {worst:.3g} (allowed 2e-2)")

    def name(c: BuildConstants) -> str:
        if new > 1:
            cores = "tensor cores (mma)" if c.prefill_tensor_cores else "CUDA cores"
            return f"numba prefill attention, {cores}"
        return f"numba split-K, {c.attn_blocks} blocks, {c.attn_load_words} words a load run"

    numba = {name(c): numba_op(op, types, tensors, sizes, c) for c in consts}
    return {
        **numba,
        "torch reference": lambda: REFERENCE[ops.PagedAttention](op, ref_ctx, q, k, v),
        "torch sdpa, gather + attend": sdpa_gather,
        "torch sdpa, pre-gathered dense": sdpa_dense,
        "torch flex_attention, gather + attend": flex_gather,
        "torch flex_attention, pre-gathered dense": flex_dense,
    }, (seqs, ctx, new)


def k1(seqs: int = 64, ctx: int = 4096) -> list[dict]:
    consts = [
        BuildConstants(attn_blocks=blocks, attn_load_words=words)
        for blocks, words in ((2048, 4), (2048, 8), (2048, 16), (8192, 8))
    ]
    variants, _ = _attention_variants(seqs, 1, ctx - 1, consts)
    kv_bytes = 2 * seqs * ctx * 8 * 128 * 2
    return [
        bw_row("K1 paged decode", n, gpu_time(fn, 10, graph=n != "torch reference"), kv_bytes)
        for n, fn in variants.items()
    ]


def _mixed_decode(ctxs: list[int], heads: int, kv_heads: int, dim=128, block=16, device="cuda"):
    """One new token per sequence over contexts of the given lengths (the new token's k/v
    included), blocks shuffled over the pool; returns the inputs bound by kernel name."""
    per = [-(-c // block) for c in ctxs]
    pool = torch.randperm(sum(per), dtype=torch.int32).tolist()
    tables, width = [], max(per)
    for n in per:
        tables.append(pool[:n] + [0] * (width - n))
        pool = pool[n:]
    table = torch.tensor(tables, dtype=torch.int32, device=device)
    shape = (sum(per), block, kv_heads, dim)
    k_cache, v_cache = (torch.randn(shape, dtype=torch.bfloat16, device=device) for _ in "kv")
    pos = torch.tensor(ctxs, device=device) - 1
    rows = torch.arange(len(ctxs), device=device)
    seqs = len(ctxs)
    return {
        "in0": torch.randn(1, seqs, heads, dim, dtype=torch.bfloat16, device=device),
        "in1": torch.randn(1, seqs, kv_heads, dim, dtype=torch.bfloat16, device=device),
        "in2": torch.randn(1, seqs, kv_heads, dim, dtype=torch.bfloat16, device=device),
        "out0": torch.empty(1, seqs, heads, dim, dtype=torch.bfloat16, device=device),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "slot_mapping": table[rows, pos // block].long() * block + pos % block,
        "query_start": torch.arange(seqs + 1, dtype=torch.int32, device=device),
        "context_lens": torch.tensor(ctxs, dtype=torch.int32, device=device),
        "block_tables": table,
    }


def k1m(seqs: int = 256, shortest: int = 100, longest: int = 2048) -> list[dict]:
    """K1 on W1's decode steps: Qwen3-0.6B's heads (16 q / 8 kv), a batch of contexts of
    mixed lengths, launched for the longest allowed (a decode CUDA graph's sizes): one split
    per sequence (2048 target blocks) or four (8192)."""
    rng = random.Random(0)
    ctxs = [rng.randint(shortest, longest) for _ in range(seqs)]
    tensors = _mixed_decode(ctxs, 16, 8)
    op = ops.PagedAttention(0, 16, 8, 128, 128**-0.5, layout="bthd")
    types = tuple(TensorType(tuple(tensors[n].shape), "bfloat16") for n in ("in0", "in1", "in2"))
    sizes = {"T": seqs, "B": seqs, "seqs": seqs, "max_context_len": longest, "max_query_len": 1}
    kv_bytes = sum(ctxs) * 8 * 128 * 2 * 2
    rows = []
    for blocks in (2048, 8192):
        fn = numba_op(op, types, tensors, sizes, BuildConstants(attn_blocks=blocks))
        variant = f"numba split-K, {blocks} blocks"
        rows.append(bw_row("K1m mixed contexts", variant, gpu_time(fn, 10), kv_bytes))
    return rows


def k1s(ctx: int = 1152, longest: int = 1280) -> list[dict]:
    """K1 at W3's decode steps: Llama-3.1-8B's heads (32 q / 8 kv), one sequence, launched
    for W3's longest context (its CUDA graph's sizes); the target blocks set how many splits
    the lone sequence's keys spread over (with splits of at least so many keys), and how many
    partials the reduce merges."""
    tensors = _mixed_decode([ctx], 32, 8)
    op = ops.PagedAttention(0, 32, 8, 128, 128**-0.5, layout="bthd")
    types = tuple(TensorType(tuple(tensors[n].shape), "bfloat16") for n in ("in0", "in1", "in2"))
    sizes = {"T": 1, "B": 1, "seqs": 1, "max_context_len": longest, "max_query_len": 1}
    kv_bytes = ctx * 8 * 128 * 2 * 2
    rows = []
    for blocks, keys in ((128, 1), (2048, 32), (2048, 64), (2048, 128)):
        consts = BuildConstants(attn_blocks=blocks, attn_split_keys=keys)
        fn = numba_op(op, types, tensors, sizes, consts)
        variant = f"numba split-K, {blocks} blocks, splits of >= {keys} keys"
        rows.append(bw_row("K1s one sequence", variant, gpu_time(fn, 10), kv_bytes))
    return rows


def k4(seqs: int = 8, new: int = 2048, cached: int = 2048) -> list[dict]:
    consts = [DEFAULTS, BuildConstants(prefill_tensor_cores=False)]
    variants, _ = _attention_variants(seqs, new, cached, consts)
    variants.pop("torch reference")  # a per-sequence python loop: minutes at this size
    keys_seen = new * cached + new * (new + 1) / 2  # causal over the cache and the new tokens
    flops = 4 * seqs * 32 * 128 * keys_seen  # q.k and p.v, 2 flops per multiply-add
    rows = []
    for name, fn in variants.items():
        timing = gpu_time(fn, 5, launches=1)
        seconds = timing.median
        rows.append(
            {
                "kernel": "K4 paged prefill",
                "variant": name,
                **timing.fields(),
                "achieved": f"{flops / seconds / 1e12:.1f} TFLOP/s",
                "of_ceiling": f"{flops / seconds / BF16_FLOPS:.1%}",
            }
        )
    return rows


BENCHES = {"k1": k1, "k1m": k1m, "k1s": k1s, "k2": k2, "k3": k3, "k4": k4}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="kiln bench kernels", description=__doc__)
    p.add_argument("--only", nargs="*", choices=sorted(BENCHES), default=sorted(BENCHES))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("kiln bench kernels needs an NVIDIA GPU")
    rows = [row for name in args.only for row in BENCHES[name]()]
    columns = ["kernel", "variant", "timing", "ms", "ms_min_max", "achieved", "of_ceiling"]
    columns += ["vs_cublas"] if "k2" in args.only else []
    print(table(rows, columns))
    print(f"wrote {save('kernels', {'rows': rows})}")


if __name__ == "__main__":
    main()
