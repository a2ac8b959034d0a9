"""The steps of the split-K decode attention kernel (attention.py), each a device function
specialized on the shapes: how a warp splits the work (Geometry), loading a run of key and
value rows, one batch of keys (scores, online softmax, values), and the merge of the warps'
partial results.

A lane owns words lane, lane + WARP, ... of every head row, for keys and values alike, so
each load of a row is one coalesced access by the whole warp. The partial dot products of a
batch of keys (every head of the group) are added up across the lanes by a reduce-scatter,
which leaves lane l with the score of one (key, head); the softmax runs on those, and the
probabilities reach every lane by shuffles for the value update.
"""

import math
from dataclasses import dataclass

import numpy as np

from codegen.cuda.dtypes import STORE
from codegen.cuda.warp import key_reduce, shfl_idx, shfl_xor, warp_sum
from codegen.cuda.words import unpacker, word_for
from codegen.numba_shim import CUDASIM, cuda, float32, uint64
from codegen.registry import cdiv
from ir.ops import PagedAttention

NEG_INF = np.float32(-np.inf)
# Lanes per warp and warps per block. The simulator runs a Python thread per CUDA thread, so
# it gets narrower "warps" (the code takes any power of two); tests may set the device's.
WARP, WARPS = (4, 2) if CUDASIM else (32, 4)
SHARED_BYTES = 48 * 1024  # static shared memory limit per block


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True, slots=True)
class Geometry:
    """How a warp splits the work; every field is a compile-time constant of the kernel."""

    word: str  # dtype the caches are read as
    per_word: int  # elements per word
    words: int  # words per head row
    row_words: int  # words of a row each lane owns: lane, lane + WARP, ...
    run: int  # keys whose rows are loaded together (a divisor of WARP)
    batch: int  # keys whose scores are reduced together (a divisor of run)
    padded: int  # the group of q heads rounded up to a power of two

    @property
    def row_floats(self) -> int:
        return self.row_words * self.per_word

    @property
    def sums(self) -> int:
        """Partial sums a lane reduces per batch: one per (key, padded head)."""
        return self.batch * self.padded

    @property
    def held(self) -> int:
        """Scores a lane holds after the reduce: heads first, first + 1, ... of one key."""
        return max(1, self.sums // WARP)

    @property
    def copies(self) -> int:
        """Neighbouring lanes that hold the same scores after the reduce."""
        return max(1, WARP // self.sums)


def geometry(dtype: str, group: int, dim: int, run_words: int) -> Geometry:
    """run_words: words of key rows a lane loads before it uses any (as many of value rows);
    the loads of a run are all in flight at once, keys and values together."""
    per_word, word = word_for(dtype, dim)
    words = dim // per_word
    row_words = cdiv(words, WARP)
    run = min(WARP, _pow2_floor(run_words // row_words))
    padded = 1 << (group - 1).bit_length()
    batch = max(1, min(run, WARP // padded))
    return Geometry(word, per_word, words, row_words, run, batch, padded)


def check_group(group: int) -> None:
    """Each thread of a block merges one q head's (max, sum): no more heads than threads."""
    if group > WARP * WARPS:
        raise ValueError(
            f"paged attention: {group} q heads per kv head, more than the {WARP * WARPS} "
            "threads of a decode attention block"
        )


def check_shared(group: int, dim: int) -> None:
    # per-warp and block (m, l), the merged acc, and the simulator's shuffle buffers
    floats = 2 * (WARPS + 1) * group + group * dim + 2 * WARPS * WARP
    if 4 * floats > SHARED_BYTES:
        raise ValueError(
            f"paged attention: {group} q heads per kv head of dim {dim} need {4 * floats} "
            f"bytes of shared memory, over {SHARED_BYTES}"
        )


def build_load_run(geo: Geometry, kv_heads: int):
    run, row_words, words = geo.run, geo.row_words, geo.words

    @cuda.jit(device=True)
    def load_run(kbuf, vbuf, k_cache, v_cache, slots, slot, first, kvh, lane, live):
        """Key and value rows of the run whose slots lanes first .. first + run hold (each
        lane holds one key's slot); only when `live` (the same in the whole warp; every
        lane shuffles either way, as the simulator needs). The caches are flat
        arrays of words, indexed unsigned: one multiply-add per row, no negative-index fixup."""
        for k in range(run):
            s = shfl_idx(slots, slot, first + k, lane)
            row = (uint64(s) * uint64(kv_heads) + uint64(kvh)) * uint64(words) + uint64(lane)
            for i in range(row_words):
                if live and i * WARP + lane < words:
                    kbuf[k, i] = k_cache[row + uint64(i * WARP)]
                    vbuf[k, i] = v_cache[row + uint64(i * WARP)]

    return load_run


def build_batch_step(op: PagedAttention, dtype: str, geo: Geometry):
    """Device function: scores, online softmax and value update of one batch of keys."""
    group = op.num_heads // op.num_kv_heads
    per_word, words, row_words, batch = geo.per_word, geo.words, geo.row_words, geo.batch
    padded, held, copies = geo.padded, geo.held, geo.copies
    unpack, reduce_sums = unpacker(dtype, per_word), key_reduce(geo.sums, WARP)
    softcap = np.float32(op.softcap or 0.0)
    first_mask = padded // held * copies  # lanes this far apart hold the same heads
    sums = geo.sums

    @cuda.jit(device=True)
    def batch_step(state, kbuf, vbuf, k0, key0, hi, xchg, lane):
        """Keys key0 .. key0 + batch (their rows at kbuf[k0 ...], vbuf[k0 ...]); positions at
        or past hi are masked. state: (qr, acc, m, alpha, m_own, l_own)."""
        qr, acc, m, alpha, m_own, l_own = state
        s = cuda.local.array(sums, float32)
        for j in range(sums):
            s[j] = float32(0.0)
        for k in range(batch):
            for i in range(row_words):
                if i * WARP + lane < words:
                    for e in range(per_word):
                        kf = unpack(kbuf[k0 + k, i], e)
                        for g in range(group):
                            s[k * padded + g] += qr[g, i * per_word + e] * kf
        first = reduce_sums(s, xchg, lane)  # s[j]: the score of (key, head first + j)
        valid = key0 + first // padded < hi
        top = cuda.local.array(held, float32)
        for j in range(held):
            x = s[j]
            if softcap > 0:
                x = math.tanh(x / softcap) * softcap
            if not valid or (first + j) % padded >= group:
                x = NEG_INF
            s[j] = top[j] = x
            mask = first_mask
            while mask < WARP:  # the batch's max of each head: over the lanes of its keys
                top[j] = max(top[j], shfl_xor(xchg, top[j], mask))
                mask *= 2
        for g in range(group):  # every lane: every head's new max, from the lanes of key 0
            m_new = max(m[g], shfl_idx(xchg, top[g % held], g // held * copies, lane))
            m_use = m_new if m_new != NEG_INF else float32(0.0)  # no key yet: not nan
            alpha[g] = math.exp(m[g] - m_use)
            m[g] = m_new
            for c in range(row_words * per_word):
                acc[g, c] *= alpha[g]
        for j in range(held):  # the lane's own (key, head) scores become probabilities
            m_new = max(m_own[j], top[j])
            m_use = m_new if m_new != NEG_INF else float32(0.0)
            s[j] = math.exp(s[j] - m_use)
            l_own[j] = l_own[j] * math.exp(m_own[j] - m_use) + s[j]
            m_own[j] = m_new
        p = cuda.local.array(group, float32)
        for k in range(batch):
            for g in range(group):
                idx = k * padded + g
                p[g] = shfl_idx(xchg, s[idx % held], idx // held * copies, lane)
            for i in range(row_words):
                if i * WARP + lane < words:
                    for e in range(per_word):
                        vf = unpack(vbuf[k0 + k, i], e)
                        for g in range(group):
                            acc[g, i * per_word + e] += p[g] * vf

    return batch_step


@cuda.jit(device=True)
def _no_batch(state, kbuf, vbuf, key0, hi, xchg, lane):
    return


def _then(step, k0: int, rest):
    @cuda.jit(device=True)
    def then(state, kbuf, vbuf, key0, hi, xchg, lane):
        step(state, kbuf, vbuf, k0, key0 + k0, hi, xchg, lane)
        rest(state, kbuf, vbuf, key0, hi, xchg, lane)

    return then


def build_run_step(op: PagedAttention, dtype: str, geo: Geometry):
    """Device function: every batch of a run of keys, in turn. Each batch is its own call
    with its offset a constant, so the row buffers are indexed by constants only (a loop
    over the batches that the compiler leaves rolled would move them to local memory)."""
    step, run_step = build_batch_step(op, dtype, geo), _no_batch
    for k0 in reversed(range(0, geo.run, geo.batch)):
        run_step = _then(step, k0, run_step)
    return run_step


def build_merge(dtype: str, group: int, dim: int, geo: Geometry):
    words, per_word, store = geo.words, geo.per_word, STORE[dtype]
    acc_floats, nt = geo.row_floats, WARP * WARPS
    lane_sum = warp_sum(WARP)

    @cuda.jit(device=True)
    def merge(out, part_acc, part_ml, acc, m, lsum, alpha, sh, t, h0, p, warp, lane):
        """Merge the warps' (m, l, acc); write the output, or the partials of split p."""
        xchg, m_sh, l_sh, acc_sh = sh  # row WARPS of m_sh, l_sh: the block's (m, l)
        tid = cuda.threadIdx.x
        for g in range(group):
            x = lane_sum(xchg, lsum[g])
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
