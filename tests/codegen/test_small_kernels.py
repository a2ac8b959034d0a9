"""Embedding, SiluMul, GatherLastTokens and the attention prologue (rope + KV-cache write)
kernels against the reference."""

import pytest
import torch
from kernel_harness import (
    FLOATS,
    assert_matches,
    gpu_test,
    launch_kernels,
    poisoned,
    rand,
    run_kernels,
    typed,
)

from codegen.registry import BuildConstants, OpKernels, build_kernels
from ir.ops import Embedding, GatherLastTokens, PagedAttention, SiluMul
from ir.reference import RefContext, rope, run_op, write_kv
from ir.types import promote


def check_embedding(vocab, hidden, tokens, dtype, ids_dtype, device="cpu"):
    weight = rand(vocab, hidden, dtype=dtype, device=device)
    ids = torch.randint(0, vocab, (1, tokens), dtype=ids_dtype, device=device)
    out = poisoned((1, tokens, hidden), dtype, device)
    op = Embedding()
    run_kernels(op, [weight, ids], [out], {"T": tokens}, (typed(weight), typed(ids, {1: "T"})))
    (expected,) = run_op(op, RefContext({"T": tokens}), weight.cpu(), ids.cpu())
    assert torch.equal(out.cpu(), expected)  # a copy: bit for bit


def check_silu_mul(shape, gate_dtype, up_dtype, device="cpu", merged=False):
    """merged: gate and up are the two halves of one tensor (strided views, read in place on
    a GPU; the simulator takes host arrays only whole, so it gets copies)."""
    if merged:
        both = rand(*shape[:-1], 2 * shape[-1], dtype=gate_dtype, device=device)
        both[..., : shape[-1]] *= 4  # gate values over silu's curved range
        gate, up = both[..., : shape[-1]], both[..., shape[-1] :]
        assert not gate.is_contiguous() and not up.is_contiguous()
    else:
        gate, up = (
            rand(*shape, dtype=gate_dtype, device=device) * 4,
            rand(*shape, dtype=up_dtype, device=device),
        )
    out = poisoned(shape, promote(gate_dtype, up_dtype), device)
    op = SiluMul()
    run_kernels(
        op, [gate, up], [out], {"T": shape[1]}, (typed(gate, {1: "T"}), typed(up, {1: "T"}))
    )
    (expected,) = run_op(op, RefContext({"T": shape[1]}), gate.cpu(), up.cpu())
    assert_matches(out, expected)


def check_gather(tokens, width, seqs, dtype, device="cpu"):
    x = rand(1, tokens, width, dtype=dtype, device=device)
    indices = torch.randperm(tokens, device=device)[:seqs]
    out = poisoned((1, seqs, width), dtype, device)
    op = GatherLastTokens(dim=1)
    types = (typed(x, {1: "T"}), typed(indices, {0: "B"}))
    run_kernels(op, [x, indices], [out], {"T": tokens, "B": seqs}, types)
    (expected,) = run_op(op, RefContext({"T": tokens, "B": seqs}), x.cpu(), indices.cpu())
    assert torch.equal(out.cpu(), expected)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def check_kv_write(
    heads,
    kv_heads,
    dim,
    tokens,
    dtype,
    cs_dtype=None,
    k_dtype=None,
    block=4,
    device="cpu",
    rotary_dim=None,
):
    """The prologue alone (rotated q, and k/v in the cache) against the reference, bit for bit;
    no cos/sin dtype: no rope. A few tokens are padding (slot -1) and write nothing.
    rotary_dim: rope on that many leading columns of each head only."""
    k_dtype = k_dtype or dtype
    q = rand(1, tokens, heads, dim, dtype=dtype, device=device)
    k, v = (rand(1, tokens, kv_heads, dim, dtype=k_dtype, device=device) for _ in "kv")
    num_blocks = tokens // block + 2
    slots = torch.randperm(num_blocks * block, device=device)[:tokens]
    slots[torch.randperm(tokens, device=device)[: (tokens + 2) // 4]] = -1
    cache = poisoned((num_blocks, block, kv_heads, dim), dtype, device)
    k_cache, v_cache, q_rot = cache.clone(), cache.clone(), poisoned(q.shape[1:], dtype, device)
    inputs = [q, k, v]
    if cs_dtype is not None:
        width = rotary_dim or dim
        inputs += [rand(1, tokens, width, dtype=cs_dtype, device=device) for _ in "cs"]
    op = PagedAttention(
        0,
        heads,
        kv_heads,
        dim,
        dim**-0.5,
        layout="bthd",
        rope=bool(inputs[3:]),
        rotary_dim=rotary_dim,
    )
    types = tuple(typed(t, {1: "T"}) for t in inputs)
    prologue = build_kernels(op, types, BuildConstants(block_size=block)).kernels[0]
    tensors = {f"in{i}": t for i, t in enumerate(inputs)}
    tensors |= {"k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slots, "q_rot": q_rot}
    launch_kernels(OpKernels((prologue,)), {"T": tokens}, tensors)

    q, k, v = (t.cpu()[0] for t in inputs[:3])
    if op.rope:
        c, s = (t.cpu()[0][:, None, :] for t in inputs[3:])
        r = rotary_dim or dim
        q, k = (torch.cat([rope(t[..., :r], c, s).to(t.dtype), t[..., r:]], -1) for t in (q, k))
        assert torch.equal(bits(q_rot), bits(q))
    ref_k, ref_v = cache.cpu().clone(), cache.cpu().clone()
    kept = slots.cpu() >= 0  # padding writes nothing
    write_kv(ref_k, ref_v, k[kept], v[kept], slots.cpu()[kept])
    assert torch.equal(bits(k_cache), bits(ref_k))
    assert torch.equal(bits(v_cache), bits(ref_v))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("tokens", [1, 7])
def test_rope_kv_write(dtype, tokens):
    # 6 q, 3 k and 3 v heads in groups of 4 rows: the second group of each tensor is cut
    # short; 5 column pairs a row, 20 threads a token: blocks of 32 hold parts of 2 tokens
    check_kv_write(6, 3, 10, tokens, dtype, cs_dtype=dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_partial_rotary_kv_write(dtype):
    # Phi's 0.4 and GPT-NeoX's 0.25 of a head: 8 of 20 columns rotated (pairs d, d + 4), the
    # other 12 copied; bf16 q/k with float32 tables too
    check_kv_write(4, 2, 20, 6, dtype, cs_dtype=dtype, rotary_dim=8)
    check_kv_write(2, 2, 16, 3, dtype, cs_dtype="float32", rotary_dim=4)


def test_rope_kv_write_float32_tables():
    # bf16 q and k rotated in float32 (torch promotes): products and sum rounded in float32
    check_kv_write(4, 2, 16, 5, "bfloat16", cs_dtype="float32")
    check_kv_write(2, 1, 8, 3, "float16", cs_dtype="float32", k_dtype="float32")


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("tokens", [1, 7])
def test_kv_write_without_rope(dtype, tokens):
    check_kv_write(6, 3, 10, tokens, dtype)


def test_kv_write_odd_head_dim_and_one_kv_head():
    # dim 7: the last column has no partner; one k and one v row a token
    check_kv_write(2, 1, 7, 6, "float32", block=2)
    check_kv_write(2, 1, 7, 2, "float16", block=2)


@pytest.mark.parametrize("dtype", FLOATS)
def test_embedding(dtype):
    check_embedding(vocab=50, hidden=40, tokens=5, dtype=dtype, ids_dtype=torch.int64)


def test_embedding_int32_ids():
    check_embedding(vocab=9, hidden=24, tokens=4, dtype="bfloat16", ids_dtype=torch.int32)


@pytest.mark.parametrize("dtype", FLOATS)
def test_silu_mul(dtype):
    check_silu_mul((1, 7, 40), dtype, dtype)


def test_silu_mul_mixed_dtypes():
    check_silu_mul((1, 3, 24), "bfloat16", "float32")


@pytest.mark.parametrize("dtype", FLOATS)
def test_gather_last_tokens(dtype):
    check_gather(tokens=9, width=37, seqs=3, dtype=dtype)


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_small_kernels_gpu(dtype):
    check_embedding(
        vocab=32003, hidden=1031, tokens=517, dtype=dtype, ids_dtype=torch.int64, device="cuda"
    )
    check_silu_mul((1, 517, 3001), dtype, dtype, device="cuda")
    check_silu_mul((1, 517, 3001), dtype, dtype, device="cuda", merged=True)
    check_gather(tokens=517, width=32003, seqs=61, dtype=dtype, device="cuda")
    for cs_dtype in (dtype, "float32"):  # float32: an fma in place of mul + add would show
        check_kv_write(32, 8, 128, 517, dtype, cs_dtype=cs_dtype, block=16, device="cuda")
    check_kv_write(16, 8, 128, 1, dtype, cs_dtype=dtype, block=16, device="cuda")
    check_kv_write(16, 8, 128, 300, dtype, block=16, device="cuda")
    for head, rotary in ((80, 32), (64, 16)):  # Phi-2's 0.4 and Pythia's 0.25 of a head
        check_kv_write(
            32, 32, head, 517, dtype, "float32", block=16, device="cuda", rotary_dim=rotary
        )
