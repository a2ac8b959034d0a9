"""PagedAttention, layout "bthd": KV-cache write, then attention.

Decode batches (one new token per sequence) run the split-K kernel and its reduce; batches
with several new tokens in a sequence run a prefill kernel: on tensor cores for bf16 and fp16
(prefill_mma.py), else the tiled CUDA-core one (prefill_attention.py).
Launches, in order:
1. the prologue (kv_write.py): rope on q/k when op.rope, new k/v into the cache.
2. attention, one block per (token, kv head, split of the token's context) serving every q
   head of that kv head (GQA), so each key and value row is read once per group. The token
   finds its sequence in query_start and attends causally (and within the sliding window)
   over its cached context, straight from block_tables. The split is read in runs of keys
   (BuildConstants.attn_load_words), warp w taking runs w, w + WARPS, ...; a warp loads the
   key and value rows of a run before it uses any, keeps its own online softmax in fp32
   (decode_passes.py), and needs no block barrier until the warps merge at the end. The
   next round's slots are read while this one is. Caches are read as wide words
   (4 bf16 or fp16, 2 fp32 per int64) so that every load moves 8 bytes. With one split the
   block writes the output; with several it writes partial (acc, max, sum) to scratch.
3. reduce, only with several splits: merges the partials of each (token, head), an empty
   split's being (max, sum) = (-inf, 0) alone, so the reduce reads no context length and its
   first loads wait on nothing; a variant for few splits (one round of loads) and one for
   many (four thread groups).
4. or instead of 2-3, prefill attention, when a sequence has several new tokens.
The number of splits (grid z) comes from the launch's sizes (`decode_splits`): a lone
sequence spreads its context over many blocks, a large batch needs none. Each token cuts its
own visible context into that many whole chunks, so a CUDA graph captured once per batch
size serves every context length; splits past a short context return at once. The cache
has q's dtype.
"""

import math
from collections.abc import Callable
from dataclasses import replace

from codegen.cuda.blockops import pow2_threads
from codegen.cuda.decode_passes import (
    NEG_INF,
    WARP,
    WARPS,
    build_load_run,
    build_merge,
    build_run_step,
    check_group,
    check_shared,
    geometry,
)
from codegen.cuda.dtypes import LOAD, STORAGE, STORE
from codegen.cuda.kv_write import build_kv_write
from codegen.cuda.prefill_attention import build_prefill_attention
from codegen.cuda.prefill_mma import build_prefill_attention_mma, supports
from codegen.cuda.warp import shfl_xor
from codegen.numba_shim import cuda, float32, int32, int64
from codegen.registry import (
    SEQUENCE_PARAMS,
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


@cuda.jit(device=True)
def decode_position(context_lens, t):
    """Position of token t of a decode launch: every sequence has one new token, so token t
    is sequence t's (no search of query_start), the last position of its context."""
    return int64(context_lens[t]) - 1


# decode launches need no query_start: one token per sequence makes it 0, 1, ..., T
DECODE_PARAMS = SEQUENCE_PARAMS[1:]  # context_lens, block_tables
MAX_SPLITS = 1024  # splits of one token's context
# thread groups of the reduce, each over its own share of the splits: one where a single
# round of loads covers the splits (a large batch's few splits), else four
REDUCE_GROUPS = (1, 4)
REDUCE_LOADS = 8  # partials of a dim a reduce thread loads before adding any


def decode_splits(s: Sizes, kv_heads: int, consts: BuildConstants, chunk: int) -> int:
    """Splits of each token's context in a decode launch (grid z): enough blocks to fill the
    GPU (consts.attn_blocks), none of the longest context shorter than a chunk of keys or
    consts.attn_split_keys; 0 when the prefill kernel runs instead."""
    if s["max_query_len"] != 1:
        return 0
    most = min(MAX_SPLITS, cdiv(s["max_context_len"], max(chunk, consts.attn_split_keys)))
    want = cdiv(consts.attn_blocks, s["T"] * kv_heads)
    return max(1, min(most, want))


@cuda.jit(device=True)
def split_span(q_pos, window, splits, chunk):
    """(first visible key, keys per split) of the token at q_pos: its visible keys cut into
    `splits` runs of whole chunks."""
    start = max(q_pos - window + 1, 0) if window > 0 else int64(0)
    per = (q_pos + 1 - start + splits - 1) // splits
    return start, (per + chunk - 1) // chunk * chunk


@cuda.jit(device=True)
def split_range(q_pos, window, splits, p, chunk):
    """Keys [lo, hi) of split p; lo >= hi when the split is empty (a short context)."""
    start, span = split_span(q_pos, window, splits, chunk)
    lo = start + int64(p) * span
    return lo, min(lo + span, q_pos + 1)


def _attention(
    op: PagedAttention, dtype: str, consts: BuildConstants, splits: Callable[[Sizes], int]
) -> Kernel:
    group, dim = op.num_heads // op.num_kv_heads, op.head_dim
    check_group(group)
    check_shared(group, dim)
    geo = geometry(dtype, group, dim, consts.attn_load_words)
    per_word, row_floats, run = geo.per_word, geo.row_floats, geo.run
    held, copies, word_type = geo.held, geo.copies, STORAGE[geo.word]
    row_words, padded = geo.row_words, geo.padded
    nt = WARP * WARPS
    ml_rows = WARPS + 1  # each warp's (m, l), then the block's
    bs, window, load = consts.block_size, op.sliding_window or 0, LOAD[dtype]
    scale = float32(op.scale)
    load_run = build_load_run(geo, op.num_kv_heads)
    run_step = build_run_step(op, dtype, geo)
    merge = build_merge(dtype, group, dim, geo)

    @cuda.jit(device=True)
    def load_q(qr, q, t, h0, lane):
        """The scaled q elements of this lane's words, as float32 (0 past the head)."""
        for g in range(group):
            for c in range(row_floats):
                d = (c // per_word * WARP + lane) * per_word + c % per_word
                qr[g, c] = load(q[t, h0 + g, d]) * scale if d < dim else float32(0.0)

    @cuda.jit(device=True)
    def lane_key(base, warp, lane):
        """Position of key `lane` of the warp's runs in the round that starts at base."""
        return base + (lane // run * WARPS + warp) * run + lane % run

    @cuda.jit(device=True)
    def slot_of(block_tables, b, pos, lo, hi):
        if pos >= hi:
            pos = lo  # masked keys read a row surely written, and get probability 0
        return int32(block_tables[b, pos // bs] * bs + pos % bs)

    @cuda.jit
    def paged_attention(out, part_acc, part_ml, q, k_cache, v_cache, context_lens, block_tables):
        kvh, t, p = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z
        b, q_pos = t, decode_position(context_lens, t)
        lo, hi = split_range(q_pos, window, cuda.gridDim.z, p, WARP)
        if lo >= hi:  # a short context has fewer splits: this one holds no key
            tid = cuda.threadIdx.x
            if tid < group:  # weight 0 in the reduce, which need not know the context
                part_ml[t, kvh * group + tid, p, 0] = NEG_INF
                part_ml[t, kvh * group + tid, p, 1] = float32(0.0)
            return
        warp, lane = cuda.threadIdx.x // WARP, cuda.threadIdx.x % WARP
        xchg = cuda.shared.array(nt, float32)  # the simulator's shuffles
        slots = cuda.shared.array(nt, int32)
        m_sh = cuda.shared.array((ml_rows, group), float32)
        l_sh = cuda.shared.array((ml_rows, group), float32)
        acc_sh = cuda.shared.array((group, dim), float32)
        qr = cuda.local.array((group, row_floats), float32)
        load_q(qr, q, t, kvh * group, lane)
        acc = cuda.local.array((group, row_floats), float32)
        m, alpha = cuda.local.array(group, float32), cuda.local.array(group, float32)
        for g in range(group):
            m[g] = NEG_INF
            for c in range(row_floats):
                acc[g, c] = float32(0.0)
        m_own, l_own = cuda.local.array(held, float32), cuda.local.array(held, float32)
        for j in range(held):
            m_own[j], l_own[j] = NEG_INF, float32(0.0)
        state = (qr, acc, m, alpha, m_own, l_own)
        kbuf = cuda.local.array((run, row_words), word_type)
        vbuf = cuda.local.array((run, row_words), word_type)
        for k in range(run):  # rows of runs past the split's end are never loaded: zeros
            for i in range(row_words):
                kbuf[k, i], vbuf[k, i] = 0, 0
        # A round covers nt keys in runs of `run`: warp w takes runs w, w + WARPS, ..., so a
        # short split still has every warp loading. Lane j holds the slot of key j of the
        # warp's runs in the round.
        base = lo
        slot = slot_of(block_tables, b, lane_key(base, warp, lane), lo, hi)
        for _ in range((hi - lo + nt - 1) // nt):  # the same trip count in every warp
            here, after = slot, base + nt
            slot = slot_of(block_tables, b, lane_key(after, warp, lane), lo, hi)  # ahead
            for first in range(0, WARP, run):
                if base + first // run * WARPS * run >= hi:
                    break  # warp 0's run is past the split's end, so every warp's is
                key0 = base + (first // run * WARPS + warp) * run
                live = key0 < hi  # a run past the split's end loads nothing
                load_run(kbuf, vbuf, k_cache, v_cache, slots, here, first, kvh, lane, live)
                run_step(state, kbuf, vbuf, key0, hi, xchg, lane)
            base = after
        # the lane's share of each head's sum: its own (key, head) scores, once per copy
        lsum, head0 = cuda.local.array(group, float32), (lane // copies) * held % padded
        for g in range(group):
            lsum[g] = float32(0.0)
            for j in range(held):
                if lane % copies == 0 and head0 + j == g:
                    lsum[g] += l_own[j]
        sh = (xchg, m_sh, l_sh, acc_sh)
        merge(out, part_acc, part_ml, acc, m, lsum, alpha, sh, t, kvh * group, p, warp, lane)

    cache = geo.word
    params = (
        Param("out0", dtype, 3),
        Param("part_acc", "float32", 4),
        Param("part_ml", "float32", 4),
        Param("q_rot" if op.rope else "in0", dtype, 3),
        Param("k_cache", cache, 1),
        Param("v_cache", cache, 1),
        *DECODE_PARAMS,
    )
    key = (op.num_heads, op.num_kv_heads, dim, op.scale, window, op.softcap, bs)
    key += (dtype, geo, WARP, WARPS)
    # the kv heads of a token run side by side: together they read whole cache rows
    grid = lambda s: (op.num_kv_heads, s["T"], splits(s))  # noqa: E731
    return Kernel(kernel_name("paged_attention", *key), paged_attention, params, (nt,), grid)


def _reduce(op: PagedAttention, dtype: str, groups: int) -> Kernel:
    heads, dim = op.num_heads, op.head_dim
    dt = pow2_threads(dim, hi=128)  # threads along head_dim
    nt = dt * groups
    store = STORE[dtype]

    @cuda.jit
    def attention_reduce(out, part_acc, part_ml):
        """Every split has its (m, l), an empty one (-inf, 0): weight 0, so no context length
        is read. Thread (group, d) has its first round of partials (dim d of splits group,
        group + groups, ...) in flight before anything waits on a load; every warp finds the
        splits' max and sum itself (shuffles, no block barrier), and the groups' sums of dim d
        meet in shared memory."""
        t, h, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        lane, group, d0 = tid % WARP, tid // dt, tid % dt
        parts = part_ml.shape[2]
        xchg = cuda.shared.array(nt, float32)  # the simulator's shuffles
        sums = cuda.shared.array((groups, dt), float32)
        first_acc = cuda.local.array(REDUCE_LOADS, float32)
        first_m = cuda.local.array(REDUCE_LOADS, float32)
        for j in range(REDUCE_LOADS):  # past the end: the last split again, weight 0 below
            q = min(group + j * groups, parts - 1)
            first_acc[j] = part_acc[t, h, q, d0] if d0 < dim else float32(0.0)
            first_m[j] = part_ml[t, h, q, 0]
        top, total = NEG_INF, float32(0.0)
        for p in range(lane, parts, WARP):
            m, m_new = part_ml[t, h, p, 0], max(top, part_ml[t, h, p, 0])
            if m_new != NEG_INF:
                total = total * math.exp(top - m_new) + part_ml[t, h, p, 1] * math.exp(m - m_new)
            top = m_new
        mask = WARP // 2
        while mask > 0:  # merge (max, sum) pairs across the warp
            m_o, l_o = shfl_xor(xchg, top, mask), shfl_xor(xchg, total, mask)
            m_new = max(top, m_o)
            if m_new != NEG_INF:
                total = total * math.exp(top - m_new) + l_o * math.exp(m_o - m_new)
            top = m_new
            mask //= 2
        for d_base in range(0, dim, dt):  # the same trip count for every thread: barriers
            d = d_base + d0
            a = cuda.local.array(REDUCE_LOADS, float32)
            for j in range(REDUCE_LOADS):
                a[j] = float32(0.0)
            if d < dim:
                for p0 in range(group, parts, groups * REDUCE_LOADS):
                    for j in range(REDUCE_LOADS):
                        p = p0 + j * groups
                        q = min(p, parts - 1)
                        if d_base == 0 and p0 == group:
                            x, m = first_acc[j], first_m[j]
                        else:
                            x, m = part_acc[t, h, q, d], part_ml[t, h, q, 0]
                        w = math.exp(m - top) if p < parts else float32(0.0)
                        if w > 0:  # an empty split's acc was never written
                            a[j] += x * w
            acc = float32(0.0)
            for j in range(REDUCE_LOADS):
                acc += a[j]
            if groups > 1:
                sums[group, d0] = acc
                cuda.syncthreads()  # every group's sum of dim d before group 0 adds them
                for g in range(1, groups):
                    acc += sums[g, d0]
            if group == 0 and d < dim:
                out[t, h, d] = store(acc / total)
            if groups > 1:
                cuda.syncthreads()  # sums read before the next dims overwrite them

    params = (
        Param("out0", dtype, 3),
        Param("part_acc", "float32", 4),
        Param("part_ml", "float32", 4),
    )
    return Kernel(
        kernel_name("attention_reduce", heads, dim, dtype, WARP, nt, REDUCE_LOADS),
        attention_reduce,
        params,
        (nt,),
        grid=lambda s: (s["T"], heads),
    )


@kernel_for(PagedAttention)
def build_paged_attention(
    op: PagedAttention, inputs: tuple[TensorType, ...], consts: BuildConstants
):
    if op.layout != "bthd":
        raise ValueError(f"PagedAttention kernels need layout 'bthd', got {op.layout!r}")
    q, k = inputs[0], inputs[1]
    cos = inputs[3] if op.rope else None
    heads, dim = op.num_heads, op.head_dim
    few, many = REDUCE_GROUPS

    def parts(s: Sizes) -> int:
        return decode_splits(s, op.num_kv_heads, consts, WARP)

    scratch = (
        Scratch("part_acc", "float32", lambda s: (s["T"], heads, parts(s), dim)),
        Scratch("part_ml", "float32", lambda s: (s["T"], heads, parts(s), 2)),
    )
    if op.rope:
        scratch += (Scratch("q_rot", q.dtype, lambda s: (s["T"], heads, dim)),)
    kernels = (
        build_kv_write(op, q, k, cos),
        replace(_attention(op, q.dtype, consts, parts), when=lambda s: parts(s) > 0),
        replace(_reduce(op, q.dtype, few), when=lambda s: 1 < parts(s) <= REDUCE_LOADS),
        replace(_reduce(op, q.dtype, many), when=lambda s: parts(s) > REDUCE_LOADS),
        _prefill(op, q.dtype, consts),  # several new tokens
    )
    return OpKernels(kernels, scratch)


def _prefill(op: PagedAttention, dtype: str, consts: BuildConstants) -> Kernel:
    """Tensor cores where the dtype and head size allow it, CUDA cores otherwise."""
    if consts.prefill_tensor_cores and supports(op, dtype):
        return build_prefill_attention_mma(op, dtype, consts.block_size)
    return build_prefill_attention(op, dtype, consts.block_size)
