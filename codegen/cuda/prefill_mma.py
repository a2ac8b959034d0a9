"""Paged prefill attention on tensor cores (bf16, fp16), FlashAttention-2 style, keys and
values read straight from block_tables (no gathered copy).

One block of 4 warps per (sequence, tile of new tokens, kv head). Its 64 rows are the
(token, q head) pairs of the kv head's group, token-major, 16 rows a warp; rows past the
tile's tokens pad. A warp holds its queries as mma A fragments in registers for the whole
walk. Per tile of KEYS keys the block stages the keys (rows of packed pairs: the B layout of
Q @ K^T) and the values (transposed, pairs of keys per dim: the B layout of P @ V) in shared
memory, in one of two buffers while the warps read the other (one barrier a tile). Each warp
1. computes its 16 x KEYS scores with mma (fp32),
2. masks, scales and soft-caps them and runs the online softmax on the fragments: a row's
   values lie in one quad of lanes, so its max takes two shuffles,
3. packs the probabilities into A fragments in registers (a score tile's accumulator layout
   is the A layout of the next product) and accumulates P @ V with mma.
The row sums stay per lane until the end (every rescale is per row), then one quad reduce.
mma.py has the fragment layouts (and the simulator's stand-in for the instruction).
"""

import math

import numpy as np

from codegen.cuda.mma import EXCHANGE, MMA_DTYPES, mma_for, packer, pair
from codegen.cuda.prefill_attention import query_tile
from codegen.cuda.warp import shfl_xor
from codegen.numba_shim import CUDASIM, cuda, float32, int16, int32, int64, uint64
from codegen.registry import SEQUENCE_PARAMS, Kernel, Param, cdiv, kernel_name
from ir.ops import PagedAttention

NEG_INF = np.float32(-np.inf)
WARP, WARPS = 32, 4
THREADS = WARP * WARPS
ROWS = 16 * WARPS  # (token, head) rows of a block
KEYS = 32  # keys per staged tile
K_PAD = 4  # int32 words after each staged key row: the 8 rows a B fragment reads hit 8 banks
V_PAD = 4  # likewise after each staged dim of the values
PAIRS = KEYS // 2
PAIR_GROUPS = THREADS // (4 * PAIRS)  # threads that share a key pair's rows
MAX_HEAD_DIM = 128  # 64 output accumulators a lane, and both tile buffers under 48 KiB


def supports(op: PagedAttention, dtype: str) -> bool:
    """Whether this kernel serves op in dtype (the CUDA-core kernel covers the rest)."""
    group = op.num_heads // op.num_kv_heads
    dim = op.head_dim
    return dtype in MMA_DTYPES and dim % 16 == 0 and dim <= MAX_HEAD_DIM and group <= ROWS


@cuda.jit(device=True)
def low32(w):
    """The low 32 bits of an int64 word as a signed int32."""
    return int32(((w & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000)


@cuda.jit(device=True)
def half16(w, e):
    """16-bit element e of an int64 word, as a signed int16 bit pattern."""
    return int16((((w >> (16 * e)) & 0xFFFF) ^ 0x8000) - 0x8000)


def build_prefill_attention_mma(op: PagedAttention, dtype: str, block_size: int) -> Kernel:
    """Attention of sequences with several new tokens; runs when max_query_len > 1."""
    if not supports(op, dtype):
        raise ValueError(f"tensor-core prefill attention does not serve {op} in {dtype}")
    heads, kv_heads, dim = op.num_heads, op.num_kv_heads, op.head_dim
    group = heads // kv_heads
    qt = ROWS // group  # tokens of a block
    k_steps, d_tiles, k_tiles = dim // 16, dim // 8, KEYS // 8
    q_words, c_words = dim // 2, dim // 4  # int32 words of a q row, int64 words of a cache row
    k_stride, v_stride = q_words + K_PAD, KEYS // 2 + V_PAD
    bs, window = block_size, op.sliding_window or 0
    scale, softcap = np.float32(op.scale), np.float32(op.softcap or 0.0)
    mma, pack = mma_for(dtype), packer(dtype)
    tile = query_tile(qt, window)
    xchg_shape = (THREADS, EXCHANGE) if CUDASIM else (1, EXCHANGE)

    k_size, v_size = KEYS * k_stride, dim * v_stride  # int32 words of a staged tile
    k_buffers, v_buffers = 2 * k_size, 2 * v_size

    @cuda.jit(device=True)
    def row_of(table, pos, kvh):
        """The first cache word of position pos's row for kv head kvh (flat, unsigned)."""
        slot = uint64(table[pos // bs]) * uint64(bs) + uint64(pos % bs)
        return (slot * uint64(kv_heads) + uint64(kvh)) * uint64(c_words)

    @cuda.jit(device=True)
    def stage(k_sh, v_sh, buf, k_cache, v_cache, table, kvh, start, count):
        """Keys start .. start + count - 1 into buffer buf: row j of k_sh = key j's pairs;
        row d of v_sh = the pairs (key 2p, key 2p + 1) of dim d. Keys past count are zeros
        (their probability is 0, and 0 times stale shared memory could be NaN). A thread
        takes one pair of keys and every PAIR_GROUPS-th run of 4 cache words (4 elements
        each) of their rows: 4 lanes cover a 32-byte sector of a row."""
        tid = cuda.threadIdx.x
        lane_w, p, run = tid % 4, (tid // 4) % PAIRS, tid // (4 * PAIRS)
        j = 2 * p
        row0 = row_of(table, start + j, kvh) if j < count else uint64(0)
        row1 = row_of(table, start + j + 1, kvh) if j + 1 < count else uint64(0)
        k_row = uint64(buf * k_size + j * k_stride)
        v_col = uint64(buf * v_size + p)
        for w0 in range(4 * run, c_words, 4 * PAIR_GROUPS):
            w = uint64(w0 + lane_w)
            k0, k1, v0, v1 = int64(0), int64(0), int64(0), int64(0)
            if j < count:
                k0, v0 = k_cache[row0 + w], v_cache[row0 + w]
            if j + 1 < count:
                k1, v1 = k_cache[row1 + w], v_cache[row1 + w]
            at = k_row + uint64(2) * w
            k_sh[at], k_sh[at + uint64(1)] = low32(k0), int32(k0 >> 32)
            at += uint64(k_stride)
            k_sh[at], k_sh[at + uint64(1)] = low32(k1), int32(k1 >> 32)
            for e in range(4):
                v_sh[v_col + (uint64(4) * w + uint64(e)) * uint64(v_stride)] = pair(
                    half16(v0, e), half16(v1, e)
                )

    @cuda.jit(device=True)
    def visible_score(s, key, pos):
        s = s * scale
        if softcap > 0:
            s = math.tanh(s / softcap) * softcap
        seen = key <= pos and (window == 0 or pos - key < window)
        return s if seen else NEG_INF

    @cuda.jit
    def prefill_attention_mma(out, q, k_cache, v_cache, query_start, context_lens, block_tables):
        b, kvh = cuda.blockIdx.x, cuda.blockIdx.z
        t0, n, first, lo, hi = tile(query_start, context_lens, b, cuda.blockIdx.y)
        if n == 0:
            return  # this sequence has fewer new tokens than the longest one
        h0 = kvh * group
        tid = uint64(cuda.threadIdx.x)  # unsigned: shared indices need no wraparound checks
        warp, lane = tid // uint64(WARP), tid % uint64(WARP)
        g, c = lane // uint64(4), lane % uint64(4)
        # two buffers: the next tile is staged while this one is read (one barrier a tile);
        # flat and unsigned, so a fragment's address is one base plus a constant offset
        k_sh = cuda.shared.array(k_buffers, int32)
        v_sh = cuda.shared.array(v_buffers, int32)
        xchg = cuda.shared.array(xchg_shape, int32)  # the simulator's fragment exchange
        fx = cuda.shared.array(THREADS, float32)  # the simulator's shuffles
        # this lane's rows r0 = 16 warp + g and r1 = r0 + 8; padding rows see no key
        r0 = int64(warp * uint64(16) + g)
        r1 = r0 + 8
        live0, live1 = r0 < n * group, r1 < n * group
        pos0 = first + r0 // group if live0 else int64(-1)
        pos1 = first + r1 // group if live1 else int64(-1)
        t_0, t_1 = t0 + r0 // group, t0 + r1 // group
        hd0, hd1 = h0 + r0 % group, h0 + r1 % group
        qa = cuda.local.array((k_steps, 4), int32)
        for s in range(k_steps):
            w = s * 8 + int64(c)
            qa[s, 0] = q[t_0, hd0, w] if live0 else 0
            qa[s, 1] = q[t_1, hd1, w] if live1 else 0
            qa[s, 2] = q[t_0, hd0, w + 4] if live0 else 0
            qa[s, 3] = q[t_1, hd1, w + 4] if live1 else 0
        o = cuda.local.array((d_tiles, 4), float32)
        for d in range(d_tiles):
            for i in range(4):
                o[d, i] = float32(0.0)
        sc = cuda.local.array((k_tiles, 4), float32)
        m0, m1 = NEG_INF, NEG_INF
        l0, l1 = float32(0.0), float32(0.0)
        table = block_tables[b]
        buf = 0
        stage(k_sh, v_sh, buf, k_cache, v_cache, table, kvh, lo, min(KEYS, hi - lo))
        for start in range(lo, hi, KEYS):
            # this tile staged, and every warp done with the other buffer's (the last) tile
            cuda.syncthreads()
            if start + KEYS < hi:
                nxt = start + KEYS
                stage(k_sh, v_sh, 1 - buf, k_cache, v_cache, table, kvh, nxt, min(KEYS, hi - nxt))
            kb = uint64(buf * k_size) + g * uint64(k_stride) + c
            vb = uint64(buf * v_size) + g * uint64(v_stride) + c
            mx0, mx1 = NEG_INF, NEG_INF
            for j in range(k_tiles):
                d0, d1, d2, d3 = float32(0.0), float32(0.0), float32(0.0), float32(0.0)
                for s in range(k_steps):
                    at = kb + uint64(j * 8 * k_stride + s * 8)
                    d0, d1, d2, d3 = mma(
                        xchg,
                        qa[s, 0],
                        qa[s, 1],
                        qa[s, 2],
                        qa[s, 3],
                        k_sh[at],
                        k_sh[at + uint64(4)],
                        d0,
                        d1,
                        d2,
                        d3,
                    )
                key = start + j * 8 + 2 * int64(c)
                sc[j, 0] = visible_score(d0, key, pos0)
                sc[j, 1] = visible_score(d1, key + 1, pos0)
                sc[j, 2] = visible_score(d2, key, pos1)
                sc[j, 3] = visible_score(d3, key + 1, pos1)
                mx0 = max(mx0, max(sc[j, 0], sc[j, 1]))
                mx1 = max(mx1, max(sc[j, 2], sc[j, 3]))
            for mask in (1, 2):  # the quad that shares the rows
                mx0 = max(mx0, shfl_xor(fx, mx0, mask))
                mx1 = max(mx1, shfl_xor(fx, mx1, mask))
            m0, mx0 = max(m0, mx0), m0  # mx*: now the previous max
            m1, mx1 = max(m1, mx1), m1
            # a row that has seen no visible key yet keeps probabilities 0, not NaN
            base0 = m0 if m0 != NEG_INF else float32(0.0)
            base1 = m1 if m1 != NEG_INF else float32(0.0)
            alpha0, alpha1 = math.exp(mx0 - base0), math.exp(mx1 - base1)
            l0, l1 = l0 * alpha0, l1 * alpha1
            for d in range(d_tiles):
                o[d, 0], o[d, 1] = o[d, 0] * alpha0, o[d, 1] * alpha0
                o[d, 2], o[d, 3] = o[d, 2] * alpha1, o[d, 3] * alpha1
            for j in range(k_tiles):
                for i in range(4):
                    p = math.exp(sc[j, i] - (base0 if i < 2 else base1))
                    sc[j, i] = p
                    if i < 2:
                        l0 += p
                    else:
                        l1 += p
            for s in range(KEYS // 16):
                a0, a1 = pack(sc[2 * s, 0], sc[2 * s, 1]), pack(sc[2 * s, 2], sc[2 * s, 3])
                a2 = pack(sc[2 * s + 1, 0], sc[2 * s + 1, 1])
                a3 = pack(sc[2 * s + 1, 2], sc[2 * s + 1, 3])
                for d in range(d_tiles):
                    at = vb + uint64(d * 8 * v_stride + s * 8)
                    o[d, 0], o[d, 1], o[d, 2], o[d, 3] = mma(
                        xchg,
                        a0,
                        a1,
                        a2,
                        a3,
                        v_sh[at],
                        v_sh[at + uint64(4)],
                        o[d, 0],
                        o[d, 1],
                        o[d, 2],
                        o[d, 3],
                    )
            buf = 1 - buf
        for mask in (1, 2):
            l0 += shfl_xor(fx, l0, mask)
            l1 += shfl_xor(fx, l1, mask)
        for d in range(d_tiles):
            w = d * 4 + int64(c)
            if live0:
                out[t_0, hd0, w] = pack(o[d, 0] / l0, o[d, 1] / l0)
            if live1:
                out[t_1, hd1, w] = pack(o[d, 2] / l1, o[d, 3] / l1)

    params = (
        Param("out0", "int32", 3),  # pairs of the output dtype
        Param("q_rot" if op.rope else "in0", "int32", 3),
        Param("k_cache", "int64", 1),  # flat, 4 elements a word
        Param("v_cache", "int64", 1),
        *SEQUENCE_PARAMS,
    )
    key = (heads, kv_heads, dim, op.scale, window, op.softcap, bs, dtype, KEYS, ROWS)
    return Kernel(
        kernel_name("prefill_attention_mma", *key),
        prefill_attention_mma,
        params,
        (THREADS,),
        grid=lambda s: (s["seqs"], cdiv(s["max_query_len"], qt), kv_heads),
        when=lambda s: s["max_query_len"] > 1,
    )
