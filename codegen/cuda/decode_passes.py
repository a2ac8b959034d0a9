"""The passes of the split-K decode attention kernel (attention.py), each a device function
specialized on the shapes: how a block splits the work (Geometry), the score pass (q.k over
cache words, reduced across the lanes of a key), the online-softmax pass, the value pass, and
the merge of the warps' partial results.
"""

import math
from dataclasses import dataclass

import numpy as np

from codegen.cuda.dtypes import STORAGE, STORE
from codegen.cuda.warp import key_reduce, shfl_xor
from codegen.cuda.words import UNPACK_OPS, unpacker, word_for
from codegen.numba_shim import CUDASIM, cuda, float32
from codegen.registry import cdiv
from ir.ops import PagedAttention

NEG_INF = np.float32(-np.inf)
# Lanes per warp and warps per block. The simulator runs a Python thread per CUDA thread, so
# it gets narrower "warps" (the code takes any power of two); tests may set the device's.
WARP, WARPS = (4, 2) if CUDASIM else (32, 4)
Q_FLOATS = 32  # q values a lane keeps in registers; more lanes share a key when q is larger
LOAD_WORDS = 16  # cache words a lane loads before using any: loads in flight hide latency
# NVVM unrolls a loop fully only below some size; past it the word buffers move from registers
# to local memory. A batch of loads is sized so that its use stays under this many operations.
UNROLLED_OPS = 384
SHARED_BYTES = 48 * 1024  # static shared memory limit per block


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a block splits the work; every field is a compile-time constant of the kernel."""

    word: str  # dtype the caches are read as
    per_word: int  # elements per word
    words: int  # words per head row
    lanes: int  # lanes that share one key in the score pass (a power of two)
    lane_words: int  # words of a key row each of those lanes reads: j, j + lanes, ...
    score_steps: int  # key steps (WARP // lanes keys each) loaded before they are used
    value_words: int  # words of a value row each lane owns: lane, lane + WARP, ...
    value_keys: int  # value rows loaded before they are used


def geometry(dtype: str, group: int, dim: int) -> Geometry:
    per_word, word = word_for(dtype, dim)
    words, word_bytes = dim // per_word, per_word * (4 if dtype == "float32" else 2)
    # enough lanes that their loads of a key fill 32-byte sectors and q fits in registers
    want = max(32 // word_bytes, cdiv(group * dim, Q_FLOATS))
    lanes = min(WARP, _pow2_floor(words), 1 << (want - 1).bit_length())
    lane_words, value_words = cdiv(words, lanes), cdiv(words, WARP)
    ops = per_word * (group + (UNPACK_OPS[dtype] if per_word > 1 else 1))  # per word used

    def batch(key_words: int) -> int:  # keys whose words a lane loads before using them
        return _pow2_floor(min(LOAD_WORDS // key_words, UNROLLED_OPS // (key_words * ops)))

    steps, value_keys = min(lanes, batch(lane_words)), min(WARP, batch(value_words))
    return Geometry(word, per_word, words, lanes, lane_words, steps, value_words, value_keys)


def check_shared(group: int, dim: int) -> None:
    # scores, per-warp and block (m, l), the merged acc, the shuffle buffer and the slots
    floats = WARPS * group * WARP + 2 * (WARPS + 1) * group + group * dim + 2 * WARPS * WARP
    if 4 * floats > SHARED_BYTES:
        raise ValueError(
            f"paged attention: {group} q heads per kv head of dim {dim} need {4 * floats} "
            f"bytes of shared memory, over {SHARED_BYTES}"
        )


def build_score_pass(op: PagedAttention, dtype: str, geo: Geometry, bs: int):
    group, words, per_word = op.num_heads // op.num_kv_heads, geo.words, geo.per_word
    lanes, lane_words, steps = geo.lanes, geo.lane_words, geo.score_steps
    keys_per_step, word_type = WARP // lanes, STORAGE[geo.word]
    padded = 1 << (group - 1).bit_length()  # s holds heads past the group as zeros
    unpack, reduce_keys = unpacker(dtype, per_word), key_reduce(padded, lanes)
    held, copies = max(1, padded // lanes), max(1, lanes // padded)  # lanes with equal sums
    scale, softcap = np.float32(op.scale), np.float32(op.softcap or 0.0)

    @cuda.jit(device=True)
    def score_pass(s_sh, xchg, qr, k_cache, slot_sh, kvh, warp, lane):
        """Scores of the warp's chunk, every head of the group, into s_sh[warp]."""
        key, part = lane // lanes, lane % lanes
        kbuf = cuda.local.array((steps, lane_words), word_type)
        s = cuda.local.array(padded, float32)
        for step0 in range(0, lanes, steps):
            for st in range(steps):
                slot = slot_sh[warp, (step0 + st) * keys_per_step + key]
                for i in range(lane_words):
                    if i * lanes + part < words:
                        kbuf[st, i] = k_cache[slot // bs, slot % bs, kvh, i * lanes + part]
            for st in range(steps):
                for g in range(padded):
                    s[g] = float32(0.0)
                for i in range(lane_words):
                    if i * lanes + part < words:
                        for e in range(per_word):
                            kf = unpack(kbuf[st, i], e)
                            for g in range(group):
                                s[g] += qr[g, i * per_word + e] * kf
                first = reduce_keys(s, xchg, part)
                for j in range(held):
                    if part % copies == 0 and first + j < group:
                        x = s[j] * scale
                        if softcap > 0:
                            x = math.tanh(x / softcap) * softcap
                        s_sh[warp, first + j, (step0 + st) * keys_per_step + key] = x

    return score_pass


def build_softmax_pass(group: int):
    @cuda.jit(device=True)
    def softmax_pass(s_sh, xchg, m, lsum, alpha, valid, warp, lane):
        """Lane j takes key j: running max, rescale alpha, probabilities back into s_sh."""
        for g in range(group):
            s = s_sh[warp, g, lane] if valid else NEG_INF
            top, mask = s, WARP // 2
            while mask > 0:
                top = max(top, shfl_xor(xchg, top, mask))
                mask //= 2
            m_new = max(m[g], top)
            m_use = m_new if m_new != NEG_INF else float32(0.0)  # no key yet: exp(-inf) not nan
            alpha[g] = math.exp(m[g] - m_use)
            p = math.exp(s - m_use)
            lsum[g] = lsum[g] * alpha[g] + p  # this lane's share; the warp's is summed at the end
            m[g] = m_new
            s_sh[warp, g, lane] = p

    return softmax_pass


def build_value_pass(dtype: str, group: int, geo: Geometry, bs: int):
    words, per_word, value_words, value_keys = (
        geo.words,
        geo.per_word,
        geo.value_words,
        geo.value_keys,
    )
    acc_floats = value_words * per_word
    word_type, unpack = STORAGE[geo.word], unpacker(dtype, per_word)

    @cuda.jit(device=True)
    def value_pass(acc, alpha, v_cache, s_sh, slot_sh, kvh, warp, lane):
        """acc = acc * alpha + p @ v over the chunk; lane l owns words l, l + WARP, ... of v."""
        for c in range(acc_floats):
            for g in range(group):
                acc[g, c] *= alpha[g]
        vbuf = cuda.local.array((value_keys, value_words), word_type)
        p = cuda.local.array(group, float32)
        for j0 in range(0, WARP, value_keys):
            for j in range(value_keys):
                slot = slot_sh[warp, j0 + j]
                for i in range(value_words):
                    if i * WARP + lane < words:
                        vbuf[j, i] = v_cache[slot // bs, slot % bs, kvh, i * WARP + lane]
            for j in range(value_keys):
                for g in range(group):
                    p[g] = s_sh[warp, g, j0 + j]
                for i in range(value_words):
                    if i * WARP + lane < words:
                        for e in range(per_word):
                            vf = unpack(vbuf[j, i], e)
                            for g in range(group):
                                acc[g, i * per_word + e] += p[g] * vf

    return value_pass


def build_merge(dtype: str, group: int, dim: int, geo: Geometry):
    words, per_word, store = geo.words, geo.per_word, STORE[dtype]
    acc_floats, nt = geo.value_words * per_word, WARP * WARPS

    @cuda.jit(device=True)
    def merge(out, part_acc, part_ml, acc, m, lsum, alpha, sh, t, h0, p, warp, lane):
        """Merge the warps' (m, l, acc); write the output, or the partials of split p."""
        xchg, m_sh, l_sh, acc_sh = sh  # row WARPS of m_sh, l_sh: the block's (m, l)
        tid = cuda.threadIdx.x
        for g in range(group):
            x, mask = lsum[g], WARP // 2
            while mask > 0:
                x += shfl_xor(xchg, x, mask)
                mask //= 2
            if lane == 0:
                m_sh[warp, g], l_sh[warp, g] = m[g], x
        cuda.syncthreads()  # every warp's (m, l) written before the block's are taken
        for g in range(group):
            top = m_sh[0, g]
            for w in range(1, WARPS):
                top = max(top, m_sh[w, g])
            alpha[g] = math.exp(m[g] - top)  # finite top: the split holds a key
        if tid < group:
            top, total = NEG_INF, float32(0.0)
            for w in range(WARPS):
                top = max(top, m_sh[w, tid])
            for w in range(WARPS):
                total += l_sh[w, tid] * math.exp(m_sh[w, tid] - top)
            m_sh[WARPS, tid], l_sh[WARPS, tid] = top, total
        # the warps add their rescaled acc in turn; a lane owns the same dims in every warp
        for turn in range(WARPS):
            if warp == turn:
                for c in range(acc_floats):
                    word = c // per_word * WARP + lane
                    if word < words:
                        for g in range(group):
                            a = acc[g, c] * alpha[g]
                            d = word * per_word + c % per_word
                            acc_sh[g, d] = a + acc_sh[g, d] if turn > 0 else a
            cuda.syncthreads()  # this warp's sums in acc_sh before the next warp adds to them
        for e in range(tid, group * dim, nt):
            g, d = e // dim, e % dim
            if cuda.gridDim.z == 1:
                out[t, h0 + g, d] = store(acc_sh[g, d] / l_sh[WARPS, g])
            else:
                part_acc[t, h0 + g, p, d] = acc_sh[g, d]
        if cuda.gridDim.z > 1 and tid < group:
            part_ml[t, h0 + tid, p, 0] = m_sh[WARPS, tid]
            part_ml[t, h0 + tid, p, 1] = l_sh[WARPS, tid]

    return merge
