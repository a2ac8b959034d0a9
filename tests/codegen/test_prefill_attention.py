"""Tiled prefill attention kernel, launched alone on filled caches, against the reference.

Cache slots no sequence owns are NaN, so a kernel that reads past a context poisons its
output; out0 starts as NaN, so a row the kernel fails to write shows too. Batches mix prefill
chunks over cached context, a decode and lengths that are not multiples of the tiles.
"""

import json
from dataclasses import replace

import pytest
from kernel_harness import FLOATS, assert_matches, gpu_test, launch_kernels, poisoned, rand
from test_aot import AOT_PREFILL, compile_without_simulator
from test_attention import Case, batch_fields, make_batch, make_cache

from codegen.cuda.prefill_attention import SHARED_LIMIT, build_prefill_attention, plan_tiles
from codegen.registry import OpKernels
from ir.ops import PagedAttention
from ir.reference import RefContext, run_op, write_kv

# head_dim 8, group 2: tiles of 32 tokens x 32 keys. The first sequence spans two query tiles
# (32 + 8 tokens) and each walks two key tiles, the last one partial.
MIXED = Case(4, 2, 8, 4, chunks=((40, 13), (1, 11), (3, 6), (5, 0)))


def attention_op(case: Case, window=None, softcap=None) -> PagedAttention:
    scale = case.head_dim**-0.5
    return PagedAttention(
        0, case.heads, case.kv_heads, case.head_dim, scale, window, softcap, layout="bthd"
    )


def check_prefill(
    case: Case, dtype: str, window=None, softcap=None, device="cpu", build=build_prefill_attention
) -> None:
    op = attention_op(case, window, softcap)
    batch, num_blocks = make_batch(case, device)
    # logits of the first sequence only (the others are partial prefill chunks): the grid
    # must still cover every sequence, not the B sampled ones
    batch = replace(batch, logits_indices=batch.logits_indices[:1])
    tokens = batch.num_tokens
    q = rand(1, tokens, case.heads, case.head_dim, dtype=dtype, device=device)
    k, v = (rand(1, tokens, case.kv_heads, case.head_dim, dtype=dtype, device=device) for _ in "kv")
    k_cache, v_cache = make_cache(case, batch, num_blocks, dtype, device)
    write_kv(k_cache, v_cache, k[0], v[0], batch.slot_mapping)  # what the prologue does
    fields = batch_fields(batch)
    # The reference's batched decode path multiplies zero probabilities by the padding it
    # gathers, so it runs on zeros where the kernel sees NaN.
    ref_cache = (k_cache.cpu().nan_to_num(0.0), v_cache.cpu().nan_to_num(0.0))
    sizes = {
        "T": tokens,
        "B": batch.num_logits,
        "seqs": batch.num_seqs,
        "max_context_len": batch.max_context_len,
        "max_query_len": batch.max_query_len,
    }
    ctx = RefContext(sizes, (ref_cache,), *(t.cpu() for t in fields.values()))
    (expected,) = run_op(op, ctx, q.cpu(), k.cpu(), v.cpu())

    kernel = build(op, dtype, case.block_size)
    assert kernel.when(sizes)
    out = poisoned((1, tokens, case.heads, case.head_dim), dtype, device)
    tensors = {"out0": out, "in0": q, "k_cache": k_cache, "v_cache": v_cache, **fields}
    launch_kernels(OpKernels((kernel,)), sizes, tensors)
    assert_matches(out, expected)


@pytest.mark.parametrize("dtype", FLOATS)
def test_mixed_batch_gqa(dtype):
    check_prefill(MIXED, dtype)


def test_sliding_window_softcap_multi_head():
    # group 1: tiles of 64 tokens over 32 keys, so the later rows of the first query tile see
    # none of the second key tile inside their 5-token window (a row of -inf, then 0s)
    case = Case(2, 2, 8, 4, chunks=((70, 9), (1, 20), (6, 3)))
    check_prefill(case, "float16", window=5, softcap=2.0)


def test_odd_group_and_head_dim():
    # group 3 in rows of 64: 21 tokens and one padding row; head_dim 12 leaves idle dims
    case = Case(6, 2, 12, 16, chunks=((25, 30), (1, 7), (2, 0)))
    check_prefill(case, "bfloat16")


def test_head_dim_256():
    # tiles of 8 tokens x 16 keys: two query tiles, each thread owns 16 output dims per row
    case = Case(2, 1, 256, 16, chunks=((10, 3),))
    check_prefill(case, "bfloat16")


def test_runs_only_with_several_new_tokens():
    kernel = build_prefill_attention(attention_op(MIXED), "float32", MIXED.block_size)
    sizes = {"T": 3, "B": 3, "seqs": 3, "max_context_len": 9, "max_query_len": 1}
    assert not kernel.when(sizes)
    assert kernel.grid({**sizes, "max_query_len": 33}) == (3, 2, MIXED.kv_heads)


@pytest.mark.parametrize("head_dim", [1, 5, 8, 12, 64, 80, 96, 112, 128, 160, 192, 256])
def test_tiles_fit_shared_memory(head_dim):
    for group in range(1, 17):
        tiles = plan_tiles(head_dim, group)
        assert tiles.shared_bytes <= SHARED_LIMIT
        assert tiles.rows % 8 == 0 and tiles.tokens * group <= tiles.rows < tiles.tokens * group + 8
        assert tiles.accumulators <= 64  # room for them in registers


def test_compiles_ahead_of_time_for_sm_90():
    configs = [(32, 8, 128, None, None, "bfloat16"), (8, 1, 256, 4096, 30.0, "float16")]
    # in a process without the simulator (it has no compiler)
    out = compile_without_simulator(
        AOT_PREFILL, "codegen.cuda.prefill_attention:build_prefill_attention", json.dumps(configs)
    )
    for record in json.loads(out):
        assert record["cubin_magic"] == "7f454c46"  # an ELF image
        assert not record["local"]  # the register tiles stayed in registers
        assert 0 < record["shared"] <= SHARED_LIMIT
        assert record["params"][:2] == ["out0", "q_rot"]


LARGE = Case(32, 8, 128, 16, chunks=((300, 0), (77, 1500), (1, 2049), (513, 40)))


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prefill_attention_gpu(dtype):
    check_prefill(LARGE, dtype, device="cuda")


@gpu_test
def test_prefill_attention_gpu_window_softcap():
    case = Case(16, 2, 256, 16, chunks=((129, 300), (1, 5), (400, 0)))
    check_prefill(case, "bfloat16", window=256, softcap=50.0, device="cuda")
