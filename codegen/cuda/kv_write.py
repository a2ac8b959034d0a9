"""Attention prologue: rope on q/k (optional) and the write of new k/v into the paged cache.

One block per token. Negative slots (padding) write nothing. Rope rounds each product and
the sum to the operands' dtype, as the reference's torch ops do, so the cache matches the
reference bit for bit.
"""

from codegen.cuda.blockops import pow2_threads
from codegen.cuda.dtypes import LOAD, STORE
from codegen.numba_shim import cuda, int64
from codegen.registry import Kernel, Param, kernel_name
from ir.ops import PagedAttention
from ir.types import TensorType, promote


def _rotator(x_dtype: str, cs_dtype: str, half: int):
    """Device function: element d of rope(x[t, h]) in float32, rounded like torch."""
    load_x, load_cs = LOAD[x_dtype], LOAD[cs_dtype]
    c_dtype = promote(x_dtype, cs_dtype)  # torch computes x * cos + rot * sin in this dtype
    load_c, store_c = LOAD[c_dtype], STORE[c_dtype]

    @cuda.jit(device=True)
    def rotate(x, t, h, d, cos, sin):
        partner = -load_x(x[t, h, d + half]) if d < half else load_x(x[t, h, d - half])
        a = load_c(store_c(load_x(x[t, h, d]) * load_cs(cos[t, d])))
        b = load_c(store_c(partner * load_cs(sin[t, d])))
        return load_c(store_c(a + b))

    return rotate


def build_kv_write(
    op: PagedAttention, q: TensorType, k: TensorType, cos: TensorType | None, block_size: int
) -> Kernel:
    """The prologue kernel; with rope it also writes rotated q to the scratch "q_rot"."""
    heads, kv_heads, dim, bs = op.num_heads, op.num_kv_heads, op.head_dim, block_size
    nt = pow2_threads(max(heads, kv_heads) * dim, hi=256)
    store_q, load_k, store_k = STORE[q.dtype], LOAD[k.dtype], STORE[k.dtype]
    store_cache = STORE[q.dtype]  # the cache holds the model's activation dtype

    @cuda.jit(device=True)
    def write_v(v_cache, v, t, blk, off):
        for e in range(cuda.threadIdx.x, kv_heads * dim, nt):
            h, d = e // dim, e % dim
            v_cache[blk, off, h, d] = store_cache(load_k(v[t, h, d]))

    @cuda.jit
    def kv_cache_write(k_cache, v_cache, k, v, slot_mapping):
        t = cuda.blockIdx.x
        slot = int64(slot_mapping[t])
        if slot >= 0:
            blk, off = slot // bs, slot % bs
            for e in range(cuda.threadIdx.x, kv_heads * dim, nt):
                h, d = e // dim, e % dim
                k_cache[blk, off, h, d] = store_cache(load_k(k[t, h, d]))
            write_v(v_cache, v, t, blk, off)

    cache = (Param("k_cache", q.dtype, 4), Param("v_cache", q.dtype, 4))
    kv = (Param("in1", k.dtype, 3), Param("in2", k.dtype, 3))
    slots = Param("slot_mapping", "int64", 1)
    grid = lambda s: (s["T"],)  # noqa: E731
    if cos is None:
        name = kernel_name("kv_cache_write", kv_heads, dim, bs, q.dtype, k.dtype)
        return Kernel(name, kv_cache_write, (*cache, *kv, slots), (nt,), grid)

    rotate_q = _rotator(q.dtype, cos.dtype, dim // 2)
    rotate_k = _rotator(k.dtype, cos.dtype, dim // 2)

    @cuda.jit
    def rope_kv_cache_write(q_rot, k_cache, v_cache, q, k, v, cos, sin, slot_mapping):
        t = cuda.blockIdx.x
        for e in range(cuda.threadIdx.x, heads * dim, nt):
            h, d = e // dim, e % dim
            q_rot[t, h, d] = store_q(rotate_q(q, t, h, d, cos, sin))
        slot = int64(slot_mapping[t])
        if slot >= 0:
            blk, off = slot // bs, slot % bs
            for e in range(cuda.threadIdx.x, kv_heads * dim, nt):
                h, d = e // dim, e % dim
                rotated = load_k(store_k(rotate_k(k, t, h, d, cos, sin)))
                k_cache[blk, off, h, d] = store_cache(rotated)
            write_v(v_cache, v, t, blk, off)

    params = (Param("q_rot", q.dtype, 3), *cache, Param("in0", q.dtype, 3), *kv)
    params += (Param("in3", cos.dtype, 2), Param("in4", cos.dtype, 2), slots)
    name = kernel_name("rope_kv_cache_write", heads, kv_heads, dim, bs, q.dtype, k.dtype, cos.dtype)
    return Kernel(name, rope_kv_cache_write, params, (nt,), grid)
