"""Tiled paged prefill attention: each staged key/value tile serves a whole tile of queries.

One block per (sequence, tile of new tokens, kv head) serves every q head of that kv head
(GQA): its rows are (token, head) pairs, token-major. It stages its query rows once, then
walks the sequence's keys, read straight from block_tables (no gathered copy), from the
window start of its first token to the position of its last. Each tile of keys, then of
values, is staged as fp32 in shared memory once and feeds every row: the score and value
products are register-tiled (each thread owns a few rows x keys, then a few rows x dims), so
each shared load feeds several FMAs on the CUDA cores. Online softmax in fp32; the output is
written directly (no split-K). Tile sizes follow head_dim and the group so that shared
memory stays under the 48 KiB static limit.

The hot loops over head_dim and keys are `while` loops: numba's range loops carry a trip count
beside the index, which hides from the optimizer that the index is non-negative and leaves
index wraparound and counter arithmetic in the inner loops (a third more instructions there).
"""

import math
from dataclasses import dataclass

import numpy as np

from codegen.cuda.dtypes import LOAD, STORE
from codegen.numba_shim import cuda, float32, int64
from codegen.registry import SEQUENCE_PARAMS, Kernel, Param, cdiv, kernel_name
from ir.ops import PagedAttention

NEG_INF = np.float32(-np.inf)
THREADS = 64  # two warps: small blocks, so that several share an SM despite their tiles
SCORE_GRID = 8  # score threads: SCORE_GRID row groups x SCORE_GRID key groups
SHARED_LIMIT = 48 * 1024  # static shared memory per block
MAX_ACCUMULATORS = 64  # output registers per thread that leave room under 255 registers
# (rows, keys) per tile, most reuse first; rows are a target, rounded to whole tokens
TILE_CHOICES = ((64, 32), (32, 32), (32, 16), (16, 16), (16, 8), (8, 8))


@dataclass(frozen=True, slots=True)
class Tiles:
    """How one block splits its work."""

    tokens: int  # new tokens per block (QT)
    rows: int  # tokens * group rounded up to SCORE_GRID; the rows past tokens * group pad
    keys: int  # keys per staged tile
    dim_threads: int  # value products: dim_threads along head_dim, the rest along rows
    width: int  # floats per staged query/key/value row: every value thread's dims, plus one
    head_dim: int

    @property
    def accumulators(self) -> int:
        """Output values each thread keeps in registers."""
        row_threads = THREADS // self.dim_threads
        return self.rows // row_threads * cdiv(self.head_dim, self.dim_threads)

    @property
    def shared_bytes(self) -> int:
        staged = (self.rows + self.keys) * self.width  # queries, keys or values
        probabilities = self.rows * (self.keys + 1)
        return 4 * (staged + probabilities + 3 * self.rows)


def plan_tiles(head_dim: int, group: int) -> Tiles:
    """The largest tiles that fit shared memory, preferring accumulators that fit registers.

    Rows of the score and staging loops are padded by one float so that threads reading
    different rows of one column hit different banks.
    """
    dim_threads = min(16, max(8, 1 << (head_dim - 1).bit_length()))
    width = cdiv(head_dim, dim_threads) * dim_threads + 1
    fitting = []
    for rows, keys in TILE_CHOICES:
        tokens = max(1, rows // group)
        padded = cdiv(tokens * group, SCORE_GRID) * SCORE_GRID
        tiles = Tiles(tokens, padded, keys, dim_threads, width, head_dim)
        if tiles.shared_bytes <= SHARED_LIMIT:
            fitting.append(tiles)
    if not fitting:
        raise ValueError(f"prefill attention: head_dim {head_dim} x group {group} too large")
    return next((t for t in fitting if t.accumulators <= MAX_ACCUMULATORS), fitting[-1])


def query_tile(qt: int, window: int):
    """Device function: (t0, n, first, lo, hi) of query tile y of sequence b: its first token,
    how many of its qt tokens there are (0: past the sequence's new tokens), the position of
    t0, and the keys the tile sees, [lo, hi) (causal end, sliding-window start)."""

    @cuda.jit(device=True)
    def tile(query_start, context_lens, b, y):
        t0 = int64(query_start[b]) + int64(y) * qt
        end = int64(query_start[b + 1])
        n = max(min(qt, end - t0), 0)
        first = int64(context_lens[b]) - (end - t0)  # position of token t0
        lo = max(first - window + 1, 0) if window > 0 else int64(0)
        return t0, n, first, lo, first + n

    return tile


def build_prefill_attention(op: PagedAttention, dtype: str, block_size: int) -> Kernel:
    """Attention of sequences with several new tokens; runs when max_query_len > 1."""
    heads, kv_heads, dim = op.num_heads, op.num_kv_heads, op.head_dim
    group = heads // kv_heads
    tiles = plan_tiles(dim, group)
    qt, rows, keys, width = tiles.tokens, tiles.rows, tiles.keys, tiles.width
    p_width = keys + 1  # padded like the staged rows
    rs, ks = rows // SCORE_GRID, keys // SCORE_GRID  # scores per thread: rs rows x ks keys
    dt = tiles.dim_threads
    rt = THREADS // dt
    rv, dv = rows // rt, cdiv(dim, dt)  # outputs per thread: rv rows x dv dims
    bs, window = block_size, op.sliding_window or 0
    scale, softcap = np.float32(op.scale), np.float32(op.softcap or 0.0)
    load, store = LOAD[dtype], STORE[dtype]
    tile = query_tile(qt, window)

    @cuda.jit(device=True)
    def stage_queries(q_sh, q, t0, h0, n):
        """Query rows as fp32; padding rows and dims are zeros."""
        tr, td = cuda.threadIdx.x // dt, cuda.threadIdx.x % dt
        for x in range(rows // rt):
            r = tr + rt * x
            for c in range(dv):
                d = td + dt * c
                value = float32(0.0)
                if r < n * group and d < dim:
                    value = load(q[t0 + r // group, h0 + r % group, d])
                q_sh[r, d] = value

    @cuda.jit(device=True)
    def stage_keys(kv_sh, cache, table, kvh, start, count):
        """Keys (or values) at positions start .. start + count - 1 as fp32 rows of kv_sh.

        Rows past count and dims past head_dim are zeros: their probabilities are 0, and
        0 times stale shared memory could be NaN.
        """
        tr, td = cuda.threadIdx.x // dt, cuda.threadIdx.x % dt
        for x in range(keys // rt):
            j = tr + rt * x
            blk, off = 0, 0
            if j < count:
                pos = start + j
                blk, off = table[pos // bs], pos % bs
            for c in range(dv):
                d = td + dt * c
                value = float32(0.0)
                if j < count and d < dim:
                    value = load(cache[blk, off, kvh, d])
                kv_sh[j, d] = value

    @cuda.jit(device=True)
    def scores(p_sh, q_sh, kv_sh, start, first, n):
        """Scaled, soft-capped scores of this key tile; keys a row may not see get -inf."""
        tr, tk = cuda.threadIdx.x // SCORE_GRID, cuda.threadIdx.x % SCORE_GRID
        acc = cuda.local.array((rs, ks), float32)
        k_reg = cuda.local.array(ks, float32)
        for i in range(rs):
            for m in range(ks):
                acc[i, m] = float32(0.0)
        d = 0
        while d < dim:
            for m in range(ks):
                k_reg[m] = kv_sh[tk + SCORE_GRID * m, d]
            for i in range(rs):
                q_val = q_sh[tr * rs + i, d]
                for m in range(ks):
                    acc[i, m] += q_val * k_reg[m]
            d += 1
        for i in range(rs):
            r = tr * rs + i
            token = r // group
            q_pos = first + token if token < n else -1  # padding rows see no key
            for m in range(ks):
                k_pos = start + tk + SCORE_GRID * m
                s = acc[i, m] * scale
                if softcap > 0:
                    s = math.tanh(s / softcap) * softcap
                visible = k_pos <= q_pos and (window == 0 or q_pos - k_pos < window)
                p_sh[r, tk + SCORE_GRID * m] = s if visible else NEG_INF

    @cuda.jit(device=True)
    def softmax_rows(p_sh, m_sh, l_sh, alpha_sh):
        """Scores -> probabilities against each row's running max; rescales its running sum."""
        for r in range(cuda.threadIdx.x, rows, THREADS):
            m_old = m_sh[r]
            m_new = m_old
            j = 0
            while j < keys:
                m_new = max(m_new, p_sh[r, j])
                j += 1
            # a row that has seen no visible key yet gets probabilities 0, not NaN
            base = m_new if m_new != NEG_INF else float32(0.0)
            total = float32(0.0)
            j = 0
            while j < keys:
                p = math.exp(p_sh[r, j] - base)
                p_sh[r, j] = p
                total += p
                j += 1
            alpha = math.exp(m_old - base)
            alpha_sh[r] = alpha
            l_sh[r] = l_sh[r] * alpha + total
            m_sh[r] = m_new

    @cuda.jit(device=True)
    def accumulate(acc, p_sh, kv_sh, alpha_sh):
        """acc = acc * alpha + probabilities @ values, for this thread's rows x dims."""
        tr, td = cuda.threadIdx.x // dt, cuda.threadIdx.x % dt
        v_reg = cuda.local.array(dv, float32)
        for i in range(rv):
            alpha = alpha_sh[tr * rv + i]
            for c in range(dv):
                acc[i, c] *= alpha
        j = 0
        while j < keys:
            for c in range(dv):
                v_reg[c] = kv_sh[j, td + dt * c]
            for i in range(rv):
                p = p_sh[tr * rv + i, j]
                for c in range(dv):
                    acc[i, c] += p * v_reg[c]
            j += 1

    @cuda.jit(device=True)
    def write_rows(out, acc, l_sh, t0, h0, n):
        tr, td = cuda.threadIdx.x // dt, cuda.threadIdx.x % dt
        for i in range(rv):
            r = tr * rv + i
            if r < n * group:
                for c in range(dv):
                    d = td + dt * c
                    if d < dim:
                        out[t0 + r // group, h0 + r % group, d] = store(acc[i, c] / l_sh[r])

    @cuda.jit
    def prefill_attention(out, q, k_cache, v_cache, query_start, context_lens, block_tables):
        b, kvh = cuda.blockIdx.x, cuda.blockIdx.z
        t0, n, first, lo, hi = tile(query_start, context_lens, b, cuda.blockIdx.y)
        if n == 0:
            return  # this sequence has fewer new tokens than the longest one
        h0 = kvh * group
        q_sh = cuda.shared.array((rows, width), float32)
        kv_sh = cuda.shared.array((keys, width), float32)
        p_sh = cuda.shared.array((rows, p_width), float32)  # scores, then probabilities
        # per row: running max, sum of exp(score - max), this tile's rescale of both
        m_sh = cuda.shared.array(rows, float32)
        l_sh = cuda.shared.array(rows, float32)
        alpha_sh = cuda.shared.array(rows, float32)
        stage_queries(q_sh, q, t0, h0, n)
        for r in range(cuda.threadIdx.x, rows, THREADS):
            m_sh[r], l_sh[r] = NEG_INF, float32(0.0)
        acc = cuda.local.array((rv, dv), float32)
        for i in range(rv):
            for c in range(dv):
                acc[i, c] = float32(0.0)
        table = block_tables[b]
        for start in range(lo, hi, keys):
            count = min(keys, hi - start)
            stage_keys(kv_sh, k_cache, table, kvh, start, count)
            cuda.syncthreads()  # keys (and queries, the first time) staged before scoring
            scores(p_sh, q_sh, kv_sh, start, first, n)
            cuda.syncthreads()  # scores written and keys read before values replace them
            softmax_rows(p_sh, m_sh, l_sh, alpha_sh)
            stage_keys(kv_sh, v_cache, table, kvh, start, count)
            cuda.syncthreads()  # probabilities and values ready before the products
            accumulate(acc, p_sh, kv_sh, alpha_sh)
            cuda.syncthreads()  # this tile consumed before the next one overwrites it
        write_rows(out, acc, l_sh, t0, h0, n)

    params = (
        Param("out0", dtype, 3),
        Param("q_rot" if op.rope else "in0", dtype, 3),
        Param("k_cache", dtype, 4),
        Param("v_cache", dtype, 4),
        *SEQUENCE_PARAMS,
    )
    key = (heads, kv_heads, dim, op.scale, window, op.softcap, bs, dtype, THREADS, tiles)
    return Kernel(
        kernel_name("prefill_attention", *key),
        prefill_attention,
        params,
        (THREADS,),
        grid=lambda s: (s["seqs"], cdiv(s["max_query_len"], qt), kv_heads),
        when=lambda s: s["max_query_len"] > 1,
    )
