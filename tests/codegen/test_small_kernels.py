"""Embedding, SiluMul and GatherLastTokens kernels against the reference."""

import pytest
import torch
from kernel_harness import FLOATS, assert_matches, gpu_test, poisoned, rand, run_kernels, typed

from ir.ops import Embedding, GatherLastTokens, SiluMul
from ir.reference import RefContext, run_op
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
