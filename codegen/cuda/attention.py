"""PagedAttention, layout "bthd": KV-cache write, then split-K paged attention.

Launches, in order:
1. the prologue (kv_write.py): rope on q/k when op.rope, new k/v into the cache.
2. attention, one block per (token, kv head, context partition), serving every q head of
   that kv head (GQA), so each key and value is read once per group: the token finds its
   sequence in query_start, then attends causally (and within the sliding window) over its
   cached context, read in tiles straight from block_tables (no gathered copy); online
   softmax in fp32. With one partition it writes the output; with several it writes
   partial (acc, max, sum) to scratch.
3. reduce, only with several partitions: merges the partials of each (token, head).
A partition is `BuildConstants.attn_partition` context tokens; sizes["max_context_len"] (the
longest context in the batch, or the longest allowed when capturing a CUDA graph) sets how
many there are. The cache has q's dtype.
"""

import math

import numpy as np

from codegen.cuda.blockops import pow2_threads
from codegen.cuda.dtypes import LOAD, STORE
from codegen.cuda.kv_write import build_kv_write
from codegen.numba_shim import cuda, float32, int32, int64
from codegen.registry import (
    BuildConstants,
    Kernel,
    OpKernels,
    Param,
    Scratch,
    Sizes,
    cdiv,
    kernel_for,
    kernel_name,
)
from ir.ops import PagedAttention
from ir.types import TensorType

NEG_INF = np.float32(-np.inf)
TILE_FLOATS = 8192  # keys staged per tile: 32 KiB, under the 48 KiB static shared-memory limit


@cuda.jit(device=True)
def find_sequence(query_start, t):
    """The sequence b with query_start[b] <= t < query_start[b + 1] (binary search)."""
    lo, hi = 0, query_start.shape[0] - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if query_start[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _attention(op: PagedAttention, dtype: str, block_size: int, partition: int) -> Kernel:
    heads, kv_heads, dim = op.num_heads, op.num_kv_heads, op.head_dim
    group = heads // kv_heads  # q heads that share one kv head, served by one block
    nt = pow2_threads(dim, hi=128)
    k_row = dim + 1  # padded so that the rows of the key tile start in different banks
    tile = min(nt, partition, TILE_FLOATS // k_row)
    dpt = cdiv(dim, nt)  # output dims per thread, for each head of the group
    bs, window = block_size, op.sliding_window or 0
    scale = np.float32(op.scale)
    softcap = np.float32(op.softcap or 0.0)
    load, store = LOAD[dtype], STORE[dtype]

    @cuda.jit
    def paged_attention(
        out, part_acc, part_ml, q, k_cache, v_cache, query_start, context_lens, block_tables
    ):
        t, kvh, p = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        tid, h0 = cuda.threadIdx.x, cuda.blockIdx.y * group
        q_sh = cuda.shared.array((group, dim), float32)
        k_sh = cuda.shared.array((tile, k_row), float32)
        s_sh = cuda.shared.array((group, tile), float32)  # scores, then probabilities
        blk_sh = cuda.shared.array(tile, int32)
        off_sh = cuda.shared.array(tile, int32)
        # per head of the group: running max, sum of exp(score - max), this tile's rescale
        m_sh = cuda.shared.array(group, float32)
        sum_sh = cuda.shared.array(group, float32)
        alpha_sh = cuda.shared.array(group, float32)
        b = find_sequence(query_start, t)
        q_pos = int64(context_lens[b]) - (int64(query_start[b + 1]) - t)
        lo, hi = int64(p) * partition, min(int64(p + 1) * partition, q_pos + 1)
        if window > 0:
            lo = max(lo, q_pos - window + 1)
        for e in range(tid, group * dim, nt):
            q_sh[e // dim, e % dim] = load(q[t, h0 + e // dim, e % dim])
        if tid < group:
            m_sh[tid], sum_sh[tid] = NEG_INF, float32(0.0)
        acc = cuda.local.array((group, dpt), float32)
        for g in range(group):
            for c in range(dpt):
                acc[g, c] = float32(0.0)
        cuda.syncthreads()  # q and the softmax state initialized
        for start in range(lo, hi, tile):
            n = min(tile, hi - start)
            if tid < n:
                pos = start + tid
                blk_sh[tid] = block_tables[b, pos // bs]
                off_sh[tid] = pos % bs
            cuda.syncthreads()  # slots known before the keys are fetched
            for e in range(tid, n * dim, nt):
                j, d = e // dim, e % dim
                k_sh[j, d] = load(k_cache[blk_sh[j], off_sh[j], kvh, d])
            cuda.syncthreads()  # keys staged before the scores read them
            for e in range(tid, group * n, nt):
                g, j = e // n, e % n
                s = float32(0.0)
                for d in range(dim):
                    s += q_sh[g, d] * k_sh[j, d]
                s *= scale
                if softcap > 0:
                    s = math.tanh(s / softcap) * softcap
                s_sh[g, j] = s
            cuda.syncthreads()  # scores written before their maxima are taken
            if tid < group:
                m_new = m_sh[tid]
                for j in range(n):
                    m_new = max(m_new, s_sh[tid, j])
                alpha_sh[tid] = math.exp(m_sh[tid] - m_new)
                m_sh[tid] = m_new
            cuda.syncthreads()  # maxima known before the probabilities use them
            for e in range(tid, group * n, nt):
                g, j = e // n, e % n
                s_sh[g, j] = math.exp(s_sh[g, j] - m_sh[g])
            cuda.syncthreads()  # probabilities written before the sums and the value pass
            if tid < group:
                total = float32(0.0)
                for j in range(n):
                    total += s_sh[tid, j]
                sum_sh[tid] = sum_sh[tid] * alpha_sh[tid] + total
            for c in range(dpt):
                d = tid + c * nt
                if d < dim:
                    for g in range(group):
                        acc[g, c] *= alpha_sh[g]
                    for j in range(n):
                        v = load(v_cache[blk_sh[j], off_sh[j], kvh, d])  # read once per group
                        for g in range(group):
                            acc[g, c] += s_sh[g, j] * v
            cuda.syncthreads()  # this tile consumed before the next one overwrites it
        for c in range(dpt):
            d = tid + c * nt
            if d < dim:
                for g in range(group):
                    if cuda.gridDim.z == 1:
                        out[t, h0 + g, d] = store(acc[g, c] / sum_sh[g])
                    else:
                        part_acc[t, h0 + g, p, d] = acc[g, c]
        if tid < group and cuda.gridDim.z > 1:
            part_ml[t, h0 + tid, p, 0] = m_sh[tid]
            part_ml[t, h0 + tid, p, 1] = sum_sh[tid]

    params = (
        Param("out0", dtype, 3),
        Param("part_acc", "float32", 4),
        Param("part_ml", "float32", 4),
        Param("q_rot" if op.rope else "in0", dtype, 3),
        Param("k_cache", dtype, 4),
        Param("v_cache", dtype, 4),
        Param("query_start", "int32", 1),
        Param("context_lens", "int32", 1),
        Param("block_tables", "int32", 2),
    )
    key = (heads, kv_heads, dim, op.scale, window, op.softcap, bs, partition, dtype)
    grid = lambda s: (s["T"], kv_heads, cdiv(s["max_context_len"], partition))  # noqa: E731
    return Kernel(kernel_name("paged_attention", *key), paged_attention, params, (nt,), grid)


def _reduce(op: PagedAttention, dtype: str, partition: int) -> Kernel:
    heads, dim = op.num_heads, op.head_dim
    nt = pow2_threads(dim, hi=128)
    store = STORE[dtype]

    @cuda.jit
    def attention_reduce(out, part_acc, part_ml):
        t, h = cuda.blockIdx.x, cuda.blockIdx.y
        parts = part_ml.shape[2]
        m = NEG_INF
        for p in range(parts):
            m = max(m, part_ml[t, h, p, 0])
        total = float32(0.0)
        for p in range(parts):
            total += part_ml[t, h, p, 1] * math.exp(part_ml[t, h, p, 0] - m)
        for d in range(cuda.threadIdx.x, dim, nt):
            a = float32(0.0)
            for p in range(parts):
                a += part_acc[t, h, p, d] * math.exp(part_ml[t, h, p, 0] - m)
            out[t, h, d] = store(a / total)

    params = (
        Param("out0", dtype, 3),
        Param("part_acc", "float32", 4),
        Param("part_ml", "float32", 4),
    )
    return Kernel(
        kernel_name("attention_reduce", heads, dim, dtype),
        attention_reduce,
        params,
        (nt,),
        grid=lambda s: (s["T"], heads),
        when=lambda s: cdiv(s["max_context_len"], partition) > 1,
    )


@kernel_for(PagedAttention)
def build_paged_attention(
    op: PagedAttention, inputs: tuple[TensorType, ...], consts: BuildConstants
):
    if op.layout != "bthd":
        raise ValueError(f"PagedAttention kernels need layout 'bthd', got {op.layout!r}")
    q, k = inputs[0], inputs[1]
    cos = inputs[3] if op.rope else None
    partition = consts.attn_partition
    heads, dim = op.num_heads, op.head_dim

    def parts(s: Sizes) -> int:
        return cdiv(s["max_context_len"], partition)

    scratch = (
        Scratch("part_acc", "float32", lambda s: (s["T"], heads, parts(s), dim)),
        Scratch("part_ml", "float32", lambda s: (s["T"], heads, parts(s), 2)),
    )
    if op.rope:
        scratch += (Scratch("q_rot", q.dtype, lambda s: (s["T"], heads, dim)),)
    kernels = (
        build_kv_write(op, q, k, cos, consts.block_size),
        _attention(op, q.dtype, consts.block_size, partition),
        _reduce(op, q.dtype, partition),
    )
    return OpKernels(kernels, scratch)
