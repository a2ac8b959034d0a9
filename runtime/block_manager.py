"""Paged-KV block pool: free list, reference counts and automatic prefix caching."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from runtime.sequence import Sequence


def hash_block(parent: bytes, token_ids: Seq[int]) -> bytes:
    """Chained hash of a full block: equal hashes mean equal tokens at every earlier position."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass(frozen=True, slots=True)
class PrefixHit:
    """Leading full blocks of a sequence already in the prefix cache."""

    blocks: tuple[int, ...]
    num_tokens: int  # len(blocks) * block_size


class BlockManager:
    """Hands out KV blocks to sequences and keeps freed full blocks reusable by content.

    Every block is in exactly one of three states: free (no content worth keeping, in
    `_free`), evictable (ref count 0 but registered in the prefix cache, in `_evictable`, least
    recently freed first) or in use (ref count > 0). When no sequence holds blocks,
    num_free_blocks + num_evictable_blocks == num_total_blocks.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref = [0] * num_blocks
        self._block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # block hash -> block holding that content
        # live seq -> chained hashes of its full, scheduled blocks (registered or not)
        self._seq_hashes: dict[Sequence, list[bytes]] = {}
        # (seq, block index) registered since begin_step: their K/V comes with this step
        self._fresh: list[tuple[Sequence, int]] = []
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_evictable_blocks(self) -> int:
        return len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences."""
        return 1.0 - (len(self._free) + len(self._evictable)) / self._num_blocks

    def begin_step(self) -> None:
        """A new step is being scheduled: the blocks registered before it are computed (or
        will be, by forwards already launched, before this step's)."""
        self._fresh.clear()

    def unregister_fresh(self, seqs: set[Sequence]) -> None:
        """Take the blocks `seqs` registered this step out of the prefix cache: their forward
        will not run (a failed step, a chunk taken back), so their K/V never comes. The seqs
        must be freed next (their hashes past those blocks are stale)."""
        kept = []
        for seq, i in self._fresh:
            if seq not in seqs:
                kept.append((seq, i))
                continue
            block = seq.block_table[i]
            block_hash = self._block_hash[block]
            if block_hash is not None and self._cached.get(block_hash) == block:
                del self._cached[block_hash]
            self._block_hash[block] = None
        self._fresh = kept

    def lookup(self, seq: Sequence) -> PrefixHit:
        """Longest run of the seq's leading full blocks in the cache; no state changes.

        The last token is never served from the cache: the forward must compute it so that
        there are logits to sample from. Nor is any token of a seq that still scores its
        prompt (prompt logprobs): each needs its logits.
        """
        blocks: list[int] = []
        if self._looks_up(seq):
            parent, bs = b"", self.block_size
            for i in range((seq.num_tokens - 1) // bs):
                parent = hash_block(parent, seq.token_slice(i * bs, (i + 1) * bs))
                block = self._cached.get(parent)
                if block is None:
                    break
                blocks.append(block)
        return PrefixHit(tuple(blocks), len(blocks) * self.block_size)

    def allocate(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit | None = None) -> bool:
        """Make seq.block_table cover num_computed_tokens + num_new_tokens tokens.

        On a sequence's first allocation, `hit` (from `lookup`, just before) is taken over:
        num_computed_tokens becomes hit.num_tokens and num_new_tokens count from there.
        Returns False, changing nothing, when the pool cannot supply the blocks.

        Later calls only add blocks and register the blocks the new tokens fill; so, for
        tokens that fit in the seq's last block without filling it, a call is a no-op.
        """
        hashes = self._seq_hashes.get(seq)
        if hashes is None:
            return self._allocate_first(seq, num_new_tokens, hit or PrefixHit((), 0))
        end = seq.num_computed_tokens + num_new_tokens
        num_needed = -(-end // self.block_size) - len(seq.block_table)
        if num_needed > 0:
            if num_needed > len(self._free) + len(self._evictable):
                return False
            seq.block_table.extend(self._take() for _ in range(num_needed))
        if self.enable_prefix_caching and end // self.block_size > len(hashes):
            self._register_full_blocks(seq, end)
        return True

    def _allocate_first(self, seq: Sequence, num_new_tokens: int, hit: PrefixHit) -> bool:
        end = hit.num_tokens + num_new_tokens
        num_needed = max(-(-end // self.block_size) - len(hit.blocks), 0)
        revived = sum(1 for b in hit.blocks if self._ref[b] == 0)  # leave the evictable pool
        if num_needed > len(self._free) + len(self._evictable) - revived:
            return False
        self._start(seq, hit)
        seq.block_table.extend(self._take() for _ in range(num_needed))
        self._register_full_blocks(seq, end)
        return True

    def free(self, seq: Sequence) -> None:
        """Release the seq's blocks; full cached ones stay reusable until evicted."""
        if seq in self._seq_hashes:  # a block whose last token was pending when it filled
            self._register_full_blocks(seq, seq.num_computed_tokens)
        # Tail first: a tail block is only reachable through its parents, so it should go first.
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] > 0:
                continue
            if self._block_hash[block] is None:
                self._free.append(block)
            else:
                self._evictable[block] = None
        seq.block_table.clear()
        self._seq_hashes.pop(seq, None)

    def _start(self, seq: Sequence, hit: PrefixHit) -> None:
        for block in hit.blocks:
            self._ref[block] += 1
            self._evictable.pop(block, None)
        seq.block_table[:] = hit.blocks
        self._seq_hashes[seq] = [self._block_hash[b] for b in hit.blocks]
        seq.num_computed_tokens = hit.num_tokens
        if seq.num_output_tokens == 0:
            seq.num_cached_tokens = hit.num_tokens
        if self._looks_up(seq):
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += hit.num_tokens

    def _looks_up(self, seq: Sequence) -> bool:
        """Whether the seq's prompt may come from the prefix cache (and counts as a query)."""
        return self.enable_prefix_caching and not seq.scores_prompt

    def _take(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_hash[block]]
            self._block_hash[block] = None
        self._ref[block] = 1
        return block

    def _register_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Cache every block whose tokens are all scheduled by now.

        Safe before the forward runs: within a step each layer writes all K/V before its
        attention reads, so a sequence hitting a block registered in the same step sees it.
        """
        if not self.enable_prefix_caching:
            return
        hashes, bs = self._seq_hashes[seq], self.block_size
        # a pending token (its id still on the device) waits for the next call
        for i in range(len(hashes), min(num_tokens, seq.num_known_tokens) // bs):
            parent = hashes[-1] if hashes else b""
            block_hash = hash_block(parent, seq.token_slice(i * bs, (i + 1) * bs))
            hashes.append(block_hash)
            block = seq.block_table[i]
            # Same content already cached elsewhere (e.g. identical greedy samples): keep the
            # first copy; this block stays uncached and returns to the free list when freed.
            if block_hash not in self._cached:
                self._cached[block_hash] = block
                self._block_hash[block] = block_hash
                self._fresh.append((seq, i))
