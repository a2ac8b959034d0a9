"""Tensor-core prefill attention, launched alone on filled caches, against the reference
(same harness as test_prefill_attention.py: NaN in unowned cache slots and in out0)."""

import json

import pytest
from kernel_harness import gpu_test
from test_aot import compile_without_simulator
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


# Compiles in a process without the simulator: the tensor-core instructions are in the PTX,
# the fragments stayed in registers and both tile buffers fit the static shared memory.
AOT_SCRIPT = """
import json, re, sys
from codegen.aot import compile_kernel
from codegen.cuda.prefill_mma import build_prefill_attention_mma
from ir.ops import PagedAttention
records = []
for heads, kv_heads, dim, window, softcap, dtype in json.loads(sys.argv[1]):
    op = PagedAttention(0, heads, kv_heads, dim, dim**-0.5, window, softcap, "bthd", True)
    compiled = compile_kernel(build_prefill_attention_mma(op, dtype, 16), "sm_90")
    shared = re.findall(r"\\.shared \\.align \\d+ \\.b8 \\w+\\[(\\d+)\\]", compiled.ptx)
    records.append({
        "cubin_magic": compiled.cubin[:4].hex(),
        "mma": compiled.ptx.count("mma.sync.aligned.m16n8k16"),
        "local": "ld.local" in compiled.ptx or "st.local" in compiled.ptx,
        "shared": sum(map(int, shared)),
    })
json.dump(records, sys.stdout)
"""


def test_compiles_ahead_of_time_for_sm_90():
    configs = [(16, 8, 128, None, None, "bfloat16"), (32, 8, 128, 4096, 30.0, "float16")]
    for record in json.loads(compile_without_simulator("-c", AOT_SCRIPT, json.dumps(configs))):
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
