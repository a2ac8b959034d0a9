"""Tensor-core prefill attention, launched alone on filled caches, against the reference
(same harness as test_prefill_attention.py: NaN in unowned cache slots and in out0)."""

import json

import pytest
from kernel_harness import gpu_test
from test_aot import AOT_PREFILL, compile_without_simulator
from test_attention import Case
from test_prefill_attention import LARGE, attention_op, check_prefill

from codegen.cuda.prefill_mma import build_prefill_attention_mma, supports

# head_dim 16, group 2: blocks of 32 tokens, tiles of 64 keys. The first sequence spans three
# query tiles over cached context (two key tiles, the last partial); a decode and a chunk
# that starts at position 0 ride along.
MIXED = Case(4, 2, 16, 4, chunks=((70, 13), (1, 11), (3, 6), (5, 0)))


def check(case, dtype, **kw):
    check_prefill(case, dtype, build=build_prefill_attention_mma, **kw)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_batch_gqa(dtype):
    check(MIXED, dtype)


def test_sliding_window_softcap_group_3():
    # group 3: 21 tokens a block and one padding row; the 5-token window leaves rows that see
    # none of a key tile (a row of -inf, then 0s)
    case = Case(6, 2, 32, 16, chunks=((30, 70), (2, 0)))
    check(case, "bfloat16", window=5, softcap=2.0)


def test_serves_half_precision_with_whole_k_steps_only():
    assert supports(attention_op(MIXED), "bfloat16")
    assert not supports(attention_op(MIXED), "float32")  # the CUDA-core kernel's
    assert not supports(attention_op(Case(4, 2, 24, 4, chunks=())), "float16")
    assert not supports(attention_op(Case(4, 2, 256, 4, chunks=())), "bfloat16")  # too big
    with pytest.raises(ValueError):
        build_prefill_attention_mma(attention_op(MIXED), "float32", 4)


def test_compiles_ahead_of_time_for_sm_90():
    configs = [(16, 8, 128, None, None, "bfloat16"), (32, 8, 128, 4096, 30.0, "float16")]
    # in a process without the simulator (it has no compiler)
    out = compile_without_simulator(
        AOT_PREFILL, "codegen.cuda.prefill_mma:build_prefill_attention_mma", json.dumps(configs)
    )
    for record in json.loads(out):
        assert record["cubin_magic"] == "7f454c46"  # an ELF image
        assert record["mma"] == 64  # 4 key tiles x 8 k-steps (scores), 2 x 16 (values)
        assert not record["local"]
        assert 0 < record["shared"] <= 48 * 1024


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_prefill_mma_gpu(dtype):
    check(LARGE, dtype, device="cuda")


@gpu_test
def test_prefill_mma_gpu_window_softcap():
    case = Case(16, 2, 128, 16, chunks=((129, 300), (1, 5), (400, 0)))
    check(case, "bfloat16", window=256, softcap=50.0, device="cuda")
