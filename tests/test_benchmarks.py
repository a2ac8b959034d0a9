"""Benchmark helpers on the CPU: the kernel benchmark's flex attention variant attends like
SDPA with the same offset causal mask (flex_attention run eagerly), and W3's GPU time split
counts overlapping intervals once and names the kernels around each idle gap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.kernels import flex_causal
from benchmarks.latency import idle_gaps, split_record

# Odd sizes: flex_attention (eager) and create_block_mask pad to their 128-token blocks
# themselves. cached > 0, so a plain causal mask (no offset) would give other results.
SEQS, NEW, CACHED, HEADS, KV_HEADS, DIM = 3, 5, 11, 4, 2, 16


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flex_causal_matches_sdpa(dtype, tol):
    torch.manual_seed(0)
    ctx = CACHED + NEW
    q = torch.randn(SEQS, HEADS, NEW, DIM, dtype=dtype)
    k, v = (torch.randn(SEQS, KV_HEADS, ctx, DIM, dtype=dtype) for _ in "kv")
    got = flex_causal(NEW, CACHED, "cpu", compiled=False)(q, k, v)

    # the query at new-token index i sits at position CACHED + i and sees keys 0..CACHED + i
    mask = torch.arange(ctx)[None, :] <= torch.arange(CACHED, ctx)[:, None]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)

    # the mask's offset matters at these sizes: causal without it is far off
    plain = torch.ones(NEW, ctx, dtype=torch.bool).tril()
    wrong = F.scaled_dot_product_attention(q, k, v, attn_mask=plain, enable_gqa=True)
    assert (wrong.float() - got.float()).abs().max() > 10 * tol


def test_idle_gaps_name_what_ran_last_and_what_ends_them():
    # "inner" ends inside "a": the gap after them follows "a"; "b" and "c" touch: no gap
    spans = [(0, 4, "a"), (1, 2, "inner"), (5, 6, "b"), (6, 7, "c"), (9.5, 10, "d")]
    assert idle_gaps(spans[::-1]) == [(1.0, "a", "b"), (2.5, "c", "d")]
    assert idle_gaps([]) == []


def test_split_record_per_token():
    # two tokens of gemm (10 us) -> norm (2 us) with 1 us idle after each gemm and 4 us
    # between the tokens; a copy overlapping the first gemm adds no busy time
    spans = []
    for t in (0.0, 17.0):
        spans += [(t, t + 10, "gemm"), (t + 11, t + 13, "norm")]
    spans.append((2.0, 4.0, "copy"))
    record = split_record(spans, steps=2)
    assert record["busy_ms_per_token"] == 0.012 and record["idle_ms_per_token"] == 0.003
    assert record["median_gap_us"] == 1.0  # gaps of 1, 4, 1 us
    assert record["largest_us_per_token"][0] == {"name": "gemm", "per_token": 1.0, "us": 10.0}
    assert record["idle_us_per_token_between"] == [
        {"kernels": "norm -> gemm", "per_token": 0.5, "us": 2.0},
        {"kernels": "gemm -> norm", "per_token": 1.0, "us": 1.0},
    ]
