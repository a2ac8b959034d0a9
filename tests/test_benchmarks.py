"""Benchmark helpers on the CPU: the kernel benchmark's flex attention variant attends like
SDPA with the same offset causal mask (flex_attention run eagerly), and W3's GPU time split
counts overlapping intervals once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.gpu import busy_time
from benchmarks.kernels import flex_causal

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


def test_busy_time_counts_overlaps_once_and_gaps_not_at_all():
    # [0, 4) and [2, 5) overlap: 5; [7, 8) after an idle gap; [7.5, 7.75) inside it; unsorted
    spans = [(7.5, 7.75), (2.0, 5.0), (7.0, 8.0), (0.0, 4.0)]
    assert busy_time(spans) == 6.0
    assert busy_time([]) == 0.0
    assert busy_time([(1.0, 3.0), (3.0, 4.0)]) == 3.0  # back to back: no gap, no overlap
