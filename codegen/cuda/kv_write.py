"""Attention prologue: rope on q/k (optional) and the write of new k/v into the paged cache.

One block per (token, head of q, k or v), so that a single token still spreads over many
blocks (each thread loads a few elements, not a long serial loop). Negative slots (padding)
write nothing. Rope rounds each product and the sum to the operands' dtype, as the
reference's torch ops do, so the cache matches the reference bit for bit.
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
    nt = pow2_threads(dim, hi=128)
    store_q, load_k, store_k = STORE[q.dtype], LOAD[k.dtype], STORE[k.dtype]
    store_cache = STORE[q.dtype]  # the cache holds the model's activation dtype

    @cuda.jit
    def kv_cache_write(k_cache, v_cache, k, v, slot_mapping):
        t, j = cuda.blockIdx.x, cuda.blockIdx.y  # j: head j of k, or head j - kv_heads of v
        slot = int64(slot_mapping[t])
        if slot >= 0:
            blk, off, h = slot // bs, slot % bs, j % kv_heads
            for d in range(cuda.threadIdx.x, dim, nt):
                if j < kv_heads:
                    k_cache[blk, off, h, d] = store_cache(load_k(k[t, h, d]))
                else:
                    v_cache[blk, off, h, d] = store_cache(load_k(v[t, h, d]))

    cache = (Param("k_cache", q.dtype, 4), Param("v_cache", q.dtype, 4))
    # q, k and v may be strided views (slices of one merged projection): read in place
    kv = (Param("in1", k.dtype, 3, "A"), Param("in2", k.dtype, 3, "A"))
    slots = Param("slot_mapping", "int64", 1)
    if cos is None:
        name = kernel_name("kv_cache_write", kv_heads, dim, bs, q.dtype, k.dtype)
        grid = lambda s: (s["T"], 2 * kv_heads)  # noqa: E731
        return Kernel(name, kv_cache_write, (*cache, *kv, slots), (nt,), grid)

    rotate_q = _rotator(q.dtype, cos.dtype, dim // 2)
    rotate_k = _rotator(k.dtype, cos.dtype, dim // 2)

    @cuda.jit
    def rope_kv_cache_write(q_rot, k_cache, v_cache, q, k, v, cos, sin, slot_mapping):
        t, j = cuda.blockIdx.x, cuda.blockIdx.y  # j: head of q, then of k, then of v
        if j < heads:
            for d in range(cuda.threadIdx.x, dim, nt):
                q_rot[t, j, d] = store_q(rotate_q(q, t, j, d, cos, sin))
            return
        slot = int64(slot_mapping[t])
        if slot >= 0:
            blk, off, h = slot // bs, slot % bs, (j - heads) % kv_heads
            for d in range(cuda.threadIdx.x, dim, nt):
                if j < heads + kv_heads:
                    rotated = load_k(store_k(rotate_k(k, t, h, d, cos, sin)))
                    k_cache[blk, off, h, d] = store_cache(rotated)
                else:
                    v_cache[blk, off, h, d] = store_cache(load_k(v[t, h, d]))

    params = (Param("q_rot", q.dtype, 3), *cache, Param("in0", q.dtype, 3, "A"), *kv)
    params += (Param("in3", cos.dtype, 2), Param("in4", cos.dtype, 2), slots)
    name = kernel_name("rope_kv_cache_write", heads, kv_heads, dim, bs, q.dtype, k.dtype, cos.dtype)
    grid = lambda s: (s["T"], heads + 2 * kv_heads)  # noqa: E731
    return Kernel(name, rope_kv_cache_write, params, (nt,), grid)
