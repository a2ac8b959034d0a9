"""Block manager: pool invariants, prefix-cache hits, LRU eviction, K/V never clobbered."""

import random

import pytest

from runtime.block_manager import BlockManager
from runtime.sampling_params import SamplingParams
from runtime.sequence import Sequence


def make_seq(seq_id: int, tokens: list[int]) -> Sequence:
    return Sequence(seq_id, f"r{seq_id}", list(tokens), SamplingParams(max_tokens=8))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def run_chunk(bm: BlockManager, seq: Sequence, num_new: int, hit=None) -> bool:
    """Allocate like the scheduler does, then mark the tokens computed like update() does."""
    if not bm.allocate(seq, num_new, hit):
        return False
    seq.num_computed_tokens += num_new
    return True


class FakeKV:
    """Slot -> identity of the whole prefix whose K/V the slot holds (K/V depends on all of it)."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def write(self, seq: Sequence, start: int, end: int) -> None:
        for p in range(start, end):
            self.slots[seq.block_table[p // self.bs], p % self.bs] = tuple(seq.token_ids[: p + 1])

    def check(self, seq: Sequence) -> None:
        for p in range(seq.num_computed_tokens):
            slot = (seq.block_table[p // self.bs], p % self.bs)
            assert self.slots.get(slot) == tuple(seq.token_ids[: p + 1]), (seq.seq_id, p)


def held_blocks(seqs) -> set[int]:
    return {b for s in seqs for b in s.block_table}


def assert_pool_consistent(bm: BlockManager, live) -> None:
    held = held_blocks(live)
    assert len(held) + bm.num_free_blocks + bm.num_evictable_blocks == bm.num_total_blocks
    assert bm.usage == pytest.approx(len(held) / bm.num_total_blocks)


def test_token_slice_matches_token_ids():
    seq = make_seq(0, [5, 6, 7])
    seq.output_token_ids += [8, 9]
    for start in range(6):
        for end in range(start, 7):
            assert seq.token_slice(start, end) == seq.token_ids[start:end]


@pytest.mark.parametrize("caching", [True, False])
def test_allocate_grows_table_and_free_restores_pool(caching):
    rng = random.Random(0)
    bm = BlockManager(64, block_size=5, enable_prefix_caching=caching)
    seqs = [make_seq(i, [rng.randrange(1000) for _ in range(rng.randint(1, 40))]) for i in range(6)]
    for seq in seqs:
        while seq.num_computed_tokens < seq.num_tokens:
            n = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
            assert run_chunk(bm, seq, n)
            assert len(seq.block_table) == cdiv(seq.num_computed_tokens, 5)
    assert len(held_blocks(seqs)) == sum(len(s.block_table) for s in seqs)  # distinct prompts
    assert_pool_consistent(bm, seqs)
    for seq in seqs:
        bm.free(seq)
        assert seq.block_table == []
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_total_blocks
    assert bm.usage == 0.0
    full_blocks = sum(s.num_tokens // 5 for s in seqs)
    assert bm.num_evictable_blocks == (full_blocks if caching else 0)


def test_allocate_fails_without_side_effects():
    bm = BlockManager(4, block_size=4)
    a = make_seq(0, list(range(12)))
    assert run_chunk(bm, a, 12)
    b = make_seq(1, list(range(100, 110)))
    assert not bm.allocate(b, 10)  # needs 3 blocks, 1 left
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert bm.num_free_blocks == 1 and bm.prefix_queries == 12
    assert run_chunk(bm, b, 4)  # one block fits


@pytest.mark.parametrize("same_step", [True, False])
def test_shared_64_token_prefix_is_served_from_cache(same_step):
    rng = random.Random(1)
    prefix = [rng.randrange(50_000) for _ in range(64)]
    bm = BlockManager(32, block_size=16)
    kv = FakeKV(16)
    a = make_seq(0, [*prefix, *range(10)])
    b = make_seq(1, [*prefix, *range(500, 507)])
    assert run_chunk(bm, a, a.num_tokens)
    kv.write(a, 0, a.num_tokens)
    prefix_blocks = tuple(a.block_table[:4])
    if not same_step:
        bm.free(a)  # the prefix survives as evictable cached blocks
    hit = bm.lookup(b)
    assert hit.num_tokens == 64 and hit.blocks == prefix_blocks
    assert run_chunk(bm, b, b.num_tokens - hit.num_tokens, hit)
    assert b.num_cached_tokens == 64 and b.num_computed_tokens == b.num_tokens
    kv.write(b, 64, b.num_tokens)
    kv.check(b)  # the cached prefix slots hold exactly b's prefix
    assert bm.prefix_hits == 64 and bm.prefix_queries == a.num_tokens + b.num_tokens


@pytest.mark.parametrize(("prompt_len", "cached"), [(64, 48), (65, 64), (16, 0), (17, 16)])
def test_last_token_is_never_served_from_cache(prompt_len, cached):
    bm = BlockManager(16, block_size=16)
    tokens = list(range(prompt_len))
    assert run_chunk(bm, make_seq(0, tokens), prompt_len)
    assert bm.lookup(make_seq(1, tokens)).num_tokens == cached


def test_hash_is_chained_over_the_whole_prefix():
    bm = BlockManager(16, block_size=4)
    assert run_chunk(bm, make_seq(0, [1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    # Block [5..8] matches, but after a different first block: its K/V differs.
    assert bm.lookup(make_seq(1, [0, 2, 3, 4, 5, 6, 7, 8, 9])).num_tokens == 0
    assert bm.lookup(make_seq(2, [1, 2, 3, 4, 5, 6, 7, 0, 9])).num_tokens == 4


def test_evicts_least_recently_freed_and_tails_first():
    bm = BlockManager(8, block_size=4)
    a, b = make_seq(0, list(range(9))), make_seq(1, list(range(100, 109)))
    for seq in (a, b):
        assert run_chunk(bm, seq, 9)  # 2 full cached blocks + 1 partial each
    bm.free(a)
    bm.free(b)
    assert (bm.num_free_blocks, bm.num_evictable_blocks) == (4, 4)
    c = make_seq(2, list(range(200, 220)))
    assert run_chunk(bm, c, 20)  # 5 blocks: the 4 free ones, then a's tail block
    assert bm.lookup(make_seq(3, list(range(9)))).num_tokens == 4
    assert bm.lookup(make_seq(4, list(range(100, 109)))).num_tokens == 8
    d = make_seq(5, list(range(300, 305)))
    assert run_chunk(bm, d, 5)  # 2 more: a's head block, then b's tail
    assert bm.lookup(make_seq(6, list(range(9)))).num_tokens == 0
    assert bm.lookup(make_seq(7, list(range(100, 109)))).num_tokens == 4


def test_hit_revives_evictable_blocks():
    bm = BlockManager(8, block_size=4)
    a = make_seq(0, list(range(13)))
    assert run_chunk(bm, a, 13)
    bm.free(a)
    assert bm.num_evictable_blocks == 3
    b = make_seq(1, list(range(13)))
    hit = bm.lookup(b)
    assert hit.num_tokens == 12
    assert run_chunk(bm, b, 1, hit)
    assert bm.num_evictable_blocks == 0 and bm.num_free_blocks == 4
    assert_pool_consistent(bm, [b])


def test_num_cached_tokens_is_set_by_the_prompt_stage_only():
    bm = BlockManager(8, block_size=4)
    a = make_seq(0, list(range(9)))
    assert run_chunk(bm, a, 9)
    b = make_seq(1, list(range(9)))
    assert run_chunk(bm, b, 1, bm.lookup(b))
    assert b.num_cached_tokens == 8
    b.output_token_ids += [9, 10, 11, 12]
    assert run_chunk(bm, b, 3)  # decodes fill block 2; then b is preempted and recomputed
    bm.free(b)
    b.num_computed_tokens = 0
    hit = bm.lookup(b)
    assert hit.num_tokens == 12  # its own output block is cached too
    assert run_chunk(bm, b, 1, hit)
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 13


def test_duplicate_content_is_cached_once():
    bm = BlockManager(8, block_size=4)
    a, b = make_seq(0, list(range(9))), make_seq(1, list(range(9)))
    assert run_chunk(bm, a, 9)
    assert run_chunk(bm, b, 9)  # computed again, without the hit
    assert set(a.block_table).isdisjoint(b.block_table)
    first_copy = tuple(a.block_table[:2])
    bm.free(b)
    bm.free(a)
    assert (bm.num_free_blocks, bm.num_evictable_blocks) == (6, 2)
    assert bm.lookup(make_seq(2, list(range(9)))).blocks == first_copy


def test_prefix_caching_disabled():
    bm = BlockManager(8, block_size=4, enable_prefix_caching=False)
    a = make_seq(0, list(range(13)))
    assert run_chunk(bm, a, 13)
    bm.free(a)
    assert bm.lookup(make_seq(1, list(range(13)))).num_tokens == 0
    assert (bm.num_free_blocks, bm.num_evictable_blocks) == (8, 0)
    assert bm.prefix_queries == bm.prefix_hits == 0


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_pool_consistent_and_kv_intact(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 3, 4])
    bm = BlockManager(rng.randint(12, 30), block_size=bs)
    kv = FakeKV(bs)
    families = [[rng.randrange(20) for _ in range(24)] for _ in range(3)]
    live: list[Sequence] = []
    next_id = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.3 or not live:
            fam = rng.choice(families)
            seq = make_seq(
                next_id, fam[: rng.randint(0, 24)] + [rng.randrange(20)] * rng.randint(1, 8)
            )
            next_id += 1
            hit = bm.lookup(seq)
            n = rng.randint(1, seq.num_tokens - hit.num_tokens)
            if run_chunk(bm, seq, n, hit):
                kv.write(seq, seq.num_computed_tokens - n, seq.num_computed_tokens)
                live.append(seq)
        elif op < 0.8:
            seq = rng.choice(live)
            if seq.num_computed_tokens == seq.num_tokens:
                seq.output_token_ids.append(rng.randrange(20))  # a decode step
            n = rng.randint(1, seq.num_tokens - seq.num_computed_tokens)
            if run_chunk(bm, seq, n):
                kv.write(seq, seq.num_computed_tokens - n, seq.num_computed_tokens)
        else:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        assert_pool_consistent(bm, live)
        for seq in live:
            assert len(seq.block_table) == cdiv(seq.num_computed_tokens, bs)
            kv.check(seq)  # no block of a live sequence was handed to anyone else
    assert bm.prefix_hits > 0
    for seq in live:
        bm.free(seq)
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_total_blocks
