"""Attention prologue: rope on q/k (optional) and the write of new k/v into the paged cache.

A token's heads of q (with rope), k and v are rows. A thread takes one pair of columns
(d, d + dim/2) of ROWS_PER_THREAD consecutive rows of one tensor (the last group of a tensor
cut short at its head count, so a thread runs one tensor's code) of one token: it loads every
element of them, and for rope cos and sin at d and d + dim/2 once for all its rows, before it
rotates and stores any (a rotated element needs its partner, so a pair is one thread's).
Threads run in flat (token, row group, column pair) order, THREADS a block (1024 elements a
block of 128), so a block spans tokens when a token has fewer threads, and one token still
spreads over dim/2 x row groups threads (512 for 16 q and 8 kv heads of 128: 4 blocks).
Index arithmetic is unsigned 32-bit (tokens x threads a token < 2^32), its divisions by
compile-time constants; the caches are seen as [slot, kv head, dim] (blocks and their
offsets merged), so a slot needs no division.

Partial rotary (rotary_dim R < dim): threads d < R/2 rotate the pair (d, d + R/2), the
others copy the pair (R + j, R + j + (dim - R)/2), j = d - R/2.

Negative slots (padding) write nothing. Rope rounds each product and the sum to the
operands' dtype, as the reference's torch ops do, so the cache matches the reference bit for
bit: the products and the sum are explicitly rounded float32 operations, which the compiler
cannot fuse into an fma (torch rounds the product before it adds); a rounding to a dtype the
value was just rounded to is left out (it changes nothing).
"""

import numpy as np

from codegen.cuda.dtypes import LOAD, STORE
from codegen.numba_shim import CUDASIM, cuda, float32, int64, libdevice, uint32, uint64
from codegen.registry import Kernel, Param, cdiv, kernel_name
from ir.ops import PagedAttention
from ir.types import TensorType, promote

ROWS_PER_THREAD = 4
THREADS = 32 if CUDASIM else 128

if CUDASIM:  # numpy float32 arithmetic rounds every operation and never fuses

    @cuda.jit(device=True)
    def _mul(a, b):
        return float32(a) * float32(b)

    @cuda.jit(device=True)
    def _add(a, b):
        return float32(a) + float32(b)

else:

    @cuda.jit(device=True)
    def _mul(a, b):
        return libdevice.fmul_rn(a, b)

    @cuda.jit(device=True)
    def _add(a, b):
        return libdevice.fadd_rn(a, b)


def _rounder(*dtypes: str):
    """Device function: a float32 rounded to each of `dtypes` in turn, stored as the last.

    Rounding to float32, or to the dtype the value already has, changes nothing: skipped."""
    chain = [dt for dt in dtypes[:-1] if dt != "float32"] + [dtypes[-1]]
    chain = [dt for i, dt in enumerate(chain) if i == 0 or dt != chain[i - 1]]
    store = STORE[chain[-1]]
    if len(chain) == 1:
        return store
    load_inner, store_inner = LOAD[chain[-2]], _rounder(*chain[:-1])

    @cuda.jit(device=True)
    def round_then_store(x):
        return store(load_inner(store_inner(x)))

    return round_then_store


def _rotator(c_dtype: str):
    """Device function: rope of one element, x * cos + partner * sin in float32, each product
    rounded to c_dtype like torch's ops in it; the sum is left for the caller to round."""
    round_c = _rounder(c_dtype, "float32")

    @cuda.jit(device=True)
    def rotate(x, partner, cos, sin):
        return _add(round_c(_mul(x, cos)), round_c(_mul(partner, sin)))

    return rotate


@cuda.jit(device=True)
def _keep(x, partner, cos, sin):
    return x


def _rows(per: int, load, finish, rotate=_keep):
    """Device function: rows h0 .. h0 + per - 1 (those below `count`) of token t of src, at
    columns d and e (e: only when `pair`), every load before any store; into dst[row, h]
    when `write`. With `rotate`: rope, with cos and sin at d (c0, s0) and at e (c1, s1)
    (rope always has the pair); without, a copy."""

    @cuda.jit(device=True)
    def rows(src, t, dst, row, h0, count, d, e, pair, write, c0, c1, s0, s1):
        lo = cuda.local.array(per, float32)
        hi = cuda.local.array(per, float32)
        for j in range(per):
            h = h0 + uint32(j)
            if h < count:
                lo[j] = load(src[t, h, d])
                if pair:
                    hi[j] = load(src[t, h, e])
        if write:
            for j in range(per):
                h = h0 + uint32(j)
                if h < count:
                    dst[row, h, d] = finish(rotate(lo[j], -hi[j], c0, s0))
                    if pair:
                        dst[row, h, e] = finish(rotate(hi[j], lo[j], c1, s1))

    return rows


def _placer(per: int, q_rows: int, kv_heads: int, lanes: int, nt: int):
    """(threads a token, device function: this thread's token, tensor (0 q, 1 k, 2 v), first
    row and column d) for `per` rows a thread; the token is past the last one at the end."""
    q_groups, kv_groups = cdiv(q_rows, per), cdiv(kv_heads, per)
    per_token = lanes * (q_groups + 2 * kv_groups)
    U_NT, U_PER_TOKEN, U_LANES, U_PER = (np.uint32(n) for n in (nt, per_token, lanes, per))
    U_QG, U_KG = np.uint32(q_groups), np.uint32(q_groups + kv_groups)

    @cuda.jit(device=True)
    def place():
        i = uint32(uint32(cuda.blockIdx.x) * U_NT + uint32(cuda.threadIdx.x))
        t = uint32(i // U_PER_TOKEN)
        i = uint32(i - t * U_PER_TOKEN)
        g = uint32(i // U_LANES)
        d = uint32(i - g * U_LANES)
        if g < U_QG:
            return t, 0, uint32(g * U_PER), d
        if g < U_KG:
            return t, 1, uint32((g - U_QG) * U_PER), d
        return t, 2, uint32((g - U_KG) * U_PER), d

    return per_token, place


def build_kv_write(
    op: PagedAttention, q: TensorType, k: TensorType, cos: TensorType | None
) -> Kernel:
    """The prologue kernel; with rope it also writes rotated q to the scratch "q_rot". The
    caches are indexed by slot, so the block size does not enter the code."""
    heads, kv_heads, dim = op.num_heads, op.num_kv_heads, op.head_dim
    if cos is not None and dim % 2:
        raise ValueError(f"rope needs an even head_dim, got {dim}")
    q_rows = heads if cos is not None else 0
    lanes = cdiv(dim, 2)  # column pairs (d, d + lanes); d + lanes < dim unless dim is odd
    nt, per = THREADS, ROWS_PER_THREAD
    per_token, place = _placer(per, q_rows, kv_heads, lanes, nt)
    U_LANES, U_DIM, U_HEADS, U_KV_HEADS = (np.uint32(n) for n in (lanes, dim, heads, kv_heads))
    load_k = LOAD[k.dtype]
    copy_rows = _rows(per, load_k, _rounder(q.dtype))  # the cache holds q's dtype
    grid = lambda s: (cdiv(s["T"] * per_token, nt),)  # noqa: E731

    cache = (Param("k_cache", q.dtype, 3), Param("v_cache", q.dtype, 3))  # [slot, head, dim]
    # q, k and v may be strided views (slices of one merged projection): read in place
    kv = (Param("in1", k.dtype, 3, "A"), Param("in2", k.dtype, 3, "A"))
    slots = Param("slot_mapping", "int64", 1)

    if cos is None:

        @cuda.jit
        def kv_cache_write(k_cache, v_cache, k, v, slot_mapping):
            t, kind, h0, d = place()
            if t >= uint32(k.shape[0]):
                return
            slot = int64(slot_mapping[t])
            write, row = slot >= 0, uint64(max(slot, 0))
            src, dst = (k, k_cache) if kind == 1 else (v, v_cache)
            e, x = d + U_LANES, float32(0.0)
            copy_rows(src, t, dst, row, h0, U_KV_HEADS, d, e, e < U_DIM, write, x, x, x, x)

        name = kernel_name("kv_cache_write", kv_heads, dim, q.dtype, k.dtype, per, nt)
        return Kernel(name, kv_cache_write, (*cache, *kv, slots), (nt,), grid)

    load_q, load_cs = LOAD[q.dtype], LOAD[cos.dtype]
    # torch computes x * cos + rot * sin in the promoted dtype, then casts to q's (k's) dtype
    c_q, c_k = promote(q.dtype, cos.dtype), promote(k.dtype, cos.dtype)
    q_rows_fn = _rows(per, load_q, _rounder(c_q, q.dtype), _rotator(c_q))
    k_rows_fn = _rows(per, load_k, _rounder(c_k, k.dtype, q.dtype), _rotator(c_k))
    q_copy = _rows(per, load_q, _rounder(q.dtype))
    rotary = op.rotary_dim or dim
    U_ROT, U_ROTARY, U_REST = (np.uint32(n) for n in (rotary // 2, rotary, (dim - rotary) // 2))

    @cuda.jit
    def rope_kv_cache_write(q_rot, k_cache, v_cache, q, k, v, cos, sin, slot_mapping):
        t, kind, h0, d = place()
        if t >= uint32(q.shape[0]):
            return
        slot = int64(slot_mapping[t])
        write, row = slot >= 0, uint64(max(slot, 0))
        e = d + U_LANES
        x = float32(0.0)
        if kind == 2:  # v: no rope
            copy_rows(v, t, v_cache, row, h0, U_KV_HEADS, d, e, True, write, x, x, x, x)
            return
        if d >= U_ROT:  # partial rotary: columns past the rotated ones, copied
            c = U_ROTARY + (d - U_ROT)
            f = c + U_REST
            if kind == 0:
                q_copy(q, t, q_rot, t, h0, U_HEADS, c, f, True, True, x, x, x, x)
            else:
                copy_rows(k, t, k_cache, row, h0, U_KV_HEADS, c, f, True, write, x, x, x, x)
            return
        e = d + U_ROT
        c0, c1 = load_cs(cos[t, d]), load_cs(cos[t, e])
        s0, s1 = load_cs(sin[t, d]), load_cs(sin[t, e])
        if kind == 0:
            q_rows_fn(q, t, q_rot, t, h0, U_HEADS, d, e, True, True, c0, c1, s0, s1)
        else:
            k_rows_fn(k, t, k_cache, row, h0, U_KV_HEADS, d, e, True, write, c0, c1, s0, s1)

    params = (Param("q_rot", q.dtype, 3), *cache, Param("in0", q.dtype, 3, "A"), *kv)
    params += (Param("in3", cos.dtype, 2), Param("in4", cos.dtype, 2), slots)
    key = (heads, kv_heads, dim, rotary, q.dtype, k.dtype, cos.dtype, per, nt)
    name = kernel_name("rope_kv_cache_write", *key)
    return Kernel(name, rope_kv_cache_write, params, (nt,), grid)
