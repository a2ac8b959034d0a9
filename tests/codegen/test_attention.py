"""PagedAttention kernels (rope + cache write, split-K attention, reduce) against the reference.

Both the attention output and the written KV cache are compared. Cache slots no sequence
owns, and cached positions beyond the context, start as NaN: a kernel that reads them
poisons its output, and one that writes a wrong slot shows in the cache comparison.
"""

import math
from dataclasses import dataclass

import pytest
import torch
from kernel_harness import (
    assert_matches,
    gpu_test,
    launch_kernels,
    poisoned,
    rand,
    run_kernels,
    typed,
)

from codegen.cuda import attention, decode_passes
from codegen.cuda.attention import decode_splits
from codegen.cuda.words import f16_bits_to_f32
from codegen.registry import BATCH_FIELDS, BuildConstants, OpKernels, build_kernels
from ir.ops import PagedAttention
from ir.reference import TORCH_DTYPES, RefContext, run_op
from runtime.batch import BatchInputs, build_batch


@dataclass(frozen=True, slots=True)
class Case:
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    chunks: tuple[tuple[int, int], ...]  # per sequence: (new tokens, tokens already cached)


DEFAULT_BLOCKS = BuildConstants().attn_blocks
MANY = 1 << 20  # split-K target blocks past any test's: every context split into chunks
SMALL = Case(4, 2, 8, 4, chunks=((5, 0), (1, 11), (3, 6)))  # prefill, decode, chunked prefill
DECODE = Case(4, 2, 8, 4, chunks=((1, 4), (1, 11), (1, 8), (1, 0)))  # the last: a first token


def make_batch(case: Case, device: str) -> tuple[BatchInputs, int]:
    """Sequences get blocks of a shuffled pool, so no two neighbours are adjacent."""
    need = [math.ceil((n + c) / case.block_size) for n, c in case.chunks]
    pool = torch.randperm(sum(need) + 3).tolist()  # 3 blocks nobody owns
    tables, chunks = [], []
    for (n, c), k in zip(case.chunks, need, strict=True):
        tables.append(pool[:k])
        pool = pool[k:]
        chunks.append(([0] * n, c, tables[-1]))
    return build_batch(chunks, case.block_size, device=device), sum(need) + 3


def make_cache(case: Case, batch: BatchInputs, num_blocks: int, dtype: str, device: str):
    """k and v caches: NaN everywhere but each sequence's already cached positions."""
    shape = (num_blocks, case.block_size, case.kv_heads, case.head_dim)
    caches = [poisoned(shape, dtype, device) for _ in "kv"]
    for b, (_, cached) in enumerate(case.chunks):
        slots = [
            int(batch.block_tables[b, p // case.block_size]) * case.block_size + p % case.block_size
            for p in range(cached)
        ]
        for cache in caches:
            cache.view(-1, case.kv_heads, case.head_dim)[slots] = rand(
                cached, case.kv_heads, case.head_dim, dtype=dtype, device=device
            )
    return caches


def rope_tables(positions: torch.Tensor, dim: int, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions.float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), -1)[None]  # [1, T, D]
    return angles.cos().to(TORCH_DTYPES[dtype]), angles.sin().to(TORCH_DTYPES[dtype])


def check_attention(
    case: Case,
    dtype: str,
    rope: bool,
    window=None,
    softcap=None,
    blocks=DEFAULT_BLOCKS,
    device="cpu",
    max_context_len=None,
    prefill=False,
):
    """max_context_len: the launch's (a CUDA graph's is the longest allowed), if not the batch's.

    The op runs the split-K kernel (a decode batch: one new token per sequence), or with
    `prefill`, the tiled prefill kernel: max_query_len picks between them.
    """
    batch, num_blocks = make_batch(case, device)
    assert prefill or batch.max_query_len == 1, "the decode kernels take one token a sequence"
    tokens, seqs = batch.num_tokens, batch.num_seqs
    op = PagedAttention(
        layer=0,
        num_heads=case.heads,
        num_kv_heads=case.kv_heads,
        head_dim=case.head_dim,
        scale=case.head_dim**-0.5,
        sliding_window=window,
        softcap=softcap,
        layout="bthd",
        rope=rope,
    )
    q = rand(1, tokens, case.heads, case.head_dim, dtype=dtype, device=device)
    k, v = (rand(1, tokens, case.kv_heads, case.head_dim, dtype=dtype, device=device) for _ in "kv")
    inputs = [q, k, v, *(rope_tables(batch.positions, case.head_dim, dtype) if rope else ())]
    k_cache, v_cache = make_cache(case, batch, num_blocks, dtype, device)
    # The reference's batched decode path multiplies masked-out (zero) probabilities by the
    # padding it gathers, so it runs on zeros where the kernels see NaN; the NaN of slots
    # nobody writes are put back into its cache afterwards.
    ref_cache = (k_cache.cpu().nan_to_num(0.0), v_cache.cpu().nan_to_num(0.0))
    fields = batch_fields(batch)
    ctx = RefContext({"T": tokens, "B": seqs}, (ref_cache,), *(t.cpu() for t in fields.values()))
    (expected,) = run_op(op, ctx, *(t.cpu() for t in inputs))
    unwritten = k_cache.cpu().flatten(0, 1).isnan().flatten(1).any(1)
    unwritten[batch.slot_mapping.cpu()] = False
    for cache in ref_cache:
        cache.flatten(0, 1)[unwritten] = float("nan")

    out = poisoned((1, tokens, case.heads, case.head_dim), dtype, device)
    sizes = {
        "T": tokens,
        "B": seqs,
        "seqs": seqs,
        "max_context_len": max_context_len or batch.max_context_len,
        "max_query_len": max(batch.max_query_len, 2) if prefill else 1,
    }
    # partials of splits that hold no key stay NaN: the reduce must not read them
    # splits as short as a chunk (the simulator's warps are short), so that tiny contexts are
    # split too; the default policy has its own test
    consts = BuildConstants(block_size=case.block_size, attn_blocks=blocks, attn_split_keys=1)
    parts = max(1, decode_splits(sizes, case.kv_heads, consts, attention.WARP))
    part_acc = poisoned((tokens, case.heads, parts, case.head_dim), "float32", device)
    part_ml = poisoned((tokens, case.heads, parts, 2), "float32", device)
    kernels = run_kernels(
        op,
        inputs,
        [out],
        sizes,
        tuple(typed(t, {1: "T"}) for t in inputs),
        consts,
        k_cache=k_cache,
        v_cache=v_cache,
        part_acc=part_acc,
        part_ml=part_ml,
        **fields,
    )
    assert_matches(k_cache, ref_cache[0], equal_nan=True)
    assert_matches(v_cache, ref_cache[1], equal_nan=True)
    assert_matches(out, expected)
    return kernels, sizes


def reduces_run(kernels, sizes) -> list[str]:
    """The reduce kernels that run at these sizes: over few splits (one thread group, one
    round of loads) or many (several groups)."""
    few, many = kernels.kernels[2:4]
    assert few.block[0] < many.block[0]
    return [name for name, k in (("few", few), ("many", many)) if k.when(sizes)]


def batch_fields(batch: BatchInputs) -> dict[str, torch.Tensor]:
    return {name: getattr(batch, name) for name in BATCH_FIELDS}


def test_decode_splits_policy():
    # W3's lone sequence (8 kv heads) in its graph for 1280 keys: splits of >= 64 keys, 20
    # (40 with 32-key splits); K1's 64 sequences of 4096 keys fill the blocks with 4 splits
    # each; W1's 256 sequences need none; a prefill launch runs no decode kernel
    def splits(t, ctx, query=1, consts=BuildConstants()):  # noqa: B008
        return decode_splits(
            {"T": t, "max_context_len": ctx, "max_query_len": query}, 8, consts, 32
        )

    assert splits(1, 1280) == 20
    assert splits(1, 1280, consts=BuildConstants(attn_split_keys=32)) == 40
    assert splits(64, 4096) == 4
    assert splits(256, 2048) == 1
    assert splits(1, 1280, query=7) == 0


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rope_attention_split_k(dtype):
    # as many splits as chunks of the longest context: merged by the reduce kernel
    kernels, sizes = check_attention(DECODE, dtype, rope=True, blocks=MANY)
    assert reduces_run(kernels, sizes) == ["few"]  # 3 splits: one round of loads


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_rope_attention_prefill_kernel(dtype):
    kernels, sizes = check_attention(SMALL, dtype, rope=True, prefill=True)
    assert [k.when(sizes) for k in kernels.kernels[1:]] == [False, False, False, True]


def test_prefill_kernel_window_softcap_mha():
    case = Case(3, 3, 8, 4, chunks=((9, 0), (5, 6), (1, 11)))
    check_attention(case, "bfloat16", rope=False, window=4, softcap=2.0, prefill=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_one_split(dtype):
    kernels, sizes = check_attention(DECODE, dtype, rope=False, blocks=1)
    assert reduces_run(kernels, sizes) == []  # the attention kernel writes the output itself


def test_sliding_window_and_softcap():
    check_attention(DECODE, "float16", rope=True, window=5, softcap=2.0, blocks=MANY)


@pytest.mark.parametrize("prefill", [False, True], ids=["decode", "prefill"])
def test_blocks_of_32_tokens(prefill):
    """`kiln compile --block-size 32`: contexts within one block, across two, and chunks
    that start mid-block."""
    case = Case(4, 2, 8, 32, chunks=((5, 0), (1, 40), (3, 33)) if prefill else ((1, 40), (1, 3)))
    check_attention(case, "float32", rope=True, prefill=prefill)


def test_multi_head_attention_and_several_tiles():
    # a 40-token context takes several rounds of key chunks over the warps
    case = Case(2, 2, 16, 8, chunks=((1, 39), (1, 1)))
    check_attention(case, "bfloat16", rope=False)


def test_more_q_heads_per_kv_head_than_threads_are_refused():
    # each thread merges one head: the heads past the block's threads were never written
    group = attention.WARP * attention.WARPS + 1
    op = PagedAttention(0, 2 * group, 2, 8, 1.0, layout="bthd")
    q, kv = (typed(rand(1, 3, h, 8), {1: "T"}) for h in (2 * group, 2))
    with pytest.raises(ValueError, match=f"{group} q heads per kv head"):
        build_kernels(op, (q, kv, kv), BuildConstants())


def test_head_dim_over_max_threads():
    # head_dim 256: a lane owns several words of each value row
    check_attention(Case(2, 1, 256, 4, chunks=((1, 5),)), "float32", rope=True)


def test_decode_with_mostly_empty_splits():
    # a CUDA graph launches for the longest allowed context: the splits are sized for it, so
    # these short sequences fill only their first few; the other blocks write (max, sum) =
    # (-inf, 0) alone, and the reduce must keep their NaN accumulators out. 3 q heads per kv
    # head (GQA).
    case = Case(6, 2, 8, 4, chunks=((1, 40), (1, 2), (1, 17)))
    kernels, sizes = check_attention(case, "bfloat16", rope=False, blocks=MANY, max_context_len=96)
    assert kernels.kernels[1].grid(sizes)[2] == 96 // attention.WARP
    check_attention(case, "float32", rope=True, window=11, blocks=MANY, max_context_len=96)


def test_reduce_over_more_splits_than_its_threads_hold_at_once():
    # 201 keys in 4-key splits: 51 partials, past the reduce's 4 groups x 8 loads in flight
    case = Case(4, 2, 8, 4, chunks=((1, 200), (1, 30)))
    kernels, sizes = check_attention(case, "float32", rope=False, blocks=MANY)
    parts = kernels.kernels[1].grid(sizes)[2]
    assert parts > attention.REDUCE_GROUPS[1] * attention.REDUCE_LOADS
    assert reduces_run(kernels, sizes) == ["many"]


@pytest.mark.parametrize(
    ("dtype", "head_dim", "word"),
    [
        ("bfloat16", 12, "int64"),  # 4 elements a word
        ("float16", 12, "int64"),
        ("bfloat16", 6, "int32"),  # 2 a word
        ("float16", 10, "int32"),
        ("bfloat16", 5, "bfloat16"),  # the element itself
        ("float16", 7, "float16"),
        ("float32", 6, "int64"),
        ("float32", 5, "float32"),
    ],
)
def test_cache_word_width_follows_head_dim(dtype, head_dim, word):
    case = Case(4, 2, head_dim, 4, chunks=((1, 13), (1, 4)))
    kernels, _ = check_attention(case, dtype, rope=False, blocks=MANY)
    caches = [p.dtype for p in kernels.kernels[1].params if p.name in ("k_cache", "v_cache")]
    assert caches == [word, word]


def test_gqa_group_of_4_dim_128_device_geometry(monkeypatch):
    # the decode benchmark's head shape with the device's 32-lane warps (two, not four, per
    # block: the simulator is slow), in one block of 37 keys: warp 1 has 5
    for module in (attention, decode_passes):  # the kernel's module and its passes'
        monkeypatch.setattr(module, "WARP", 32)
        monkeypatch.setattr(module, "WARPS", 2)
    check_attention(Case(4, 1, 128, 16, chunks=((1, 36),)), "bfloat16", rope=False)


def test_group_wider_than_a_warp():
    # 8 q heads per kv head over the simulator's 4-lane warps: a lane holds the scores of
    # two heads after the reduce
    assert decode_passes.geometry("bfloat16", 8, 8, 8).held == 2
    check_attention(Case(8, 1, 8, 4, chunks=((1, 13), (1, 6))), "bfloat16", rope=False)


def test_f16_bits_to_f32_every_pattern():
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32)
    expected = bits.to(torch.int16).view(torch.float16).float()
    actual = torch.tensor([f16_bits_to_f32(int(b) & 0xFFFF) for b in bits])
    assert torch.equal(actual.view(torch.int32), expected.view(torch.int32))


def test_padding_slots_write_nothing():
    case = SMALL
    batch, num_blocks = make_batch(case, "cpu")
    k_cache, v_cache = make_cache(case, batch, num_blocks, "float32", "cpu")
    before = k_cache.clone()
    op = PagedAttention(0, case.heads, case.kv_heads, case.head_dim, 1.0, layout="bthd")
    k = rand(1, batch.num_tokens, case.kv_heads, case.head_dim)
    types = tuple(
        typed(t, {1: "T"}) for t in (rand(1, batch.num_tokens, case.heads, case.head_dim), k, k)
    )
    prologue = OpKernels(
        build_kernels(op, types, BuildConstants(block_size=case.block_size)).kernels[:1]
    )
    slots = torch.full_like(batch.slot_mapping, -1)
    launch_kernels(
        prologue,
        {"T": batch.num_tokens},
        {"in1": k, "in2": k, "k_cache": k_cache, "v_cache": v_cache, "slot_mapping": slots},
    )
    assert torch.equal(k_cache.nan_to_num(), before.nan_to_num())


LARGE = Case(32, 8, 128, 16, chunks=((1, 4000), (1, 37), (1, 0), (1, 1500), (1, 2049), (1, 300)))


@gpu_test
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("blocks", [1, DEFAULT_BLOCKS, MANY])
def test_attention_gpu(dtype, blocks):
    check_attention(LARGE, dtype, rope=True, blocks=blocks, device="cuda")


@gpu_test
def test_attention_gpu_window_softcap_gqa():
    case = Case(16, 2, 64, 16, chunks=((1, 999), (1, 300), (1, 5)))
    check_attention(
        case, "bfloat16", rope=False, window=256, softcap=50.0, blocks=MANY, device="cuda"
    )
