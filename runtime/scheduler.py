"""Continuous-batching scheduler: token budget, chunked prefill, preemption by recompute.

There are no prefill and decode phases: each step, every scheduled sequence's computed-token
count catches up with its token count by as much as the budget allows.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from runtime.block_manager import BlockManager
from runtime.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

POLICIES = ("fcfs", "priority")
# prompt tokens one step scores for prompt logprobs, at most: each is a row of logits, which
# the memory profile reserves room for (model_runner.py)
MAX_SCORED_TOKENS = 2048
PREEMPTION_WARN_EVERY = 50  # the first preemption is logged, then every 50th


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step
    max_model_len: int = 2048
    enable_prefix_caching: bool = True
    policy: str = "fcfs"  # or "priority": (priority, arrival_time) order, lower first

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")


class RequestTooLong(ValueError):
    """A request that could never be served: longer than the model or the whole KV cache."""


# Not frozen: a frozen dataclass builds ~3x slower, and there is one chunk per sequence per step.
@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed this step (== seq.num_computed_tokens before the step)
    num_tokens: int  # seq.token_ids[start:start + num_tokens] run this step
    sample: bool  # the chunk reaches the end of seq.token_ids: sample a token for it
    # its first tokens whose logits score the prompt token after each (prompt_logprobs)
    prompt_logits: int = 0


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]  # one-token chunks (decodes) first, then longer chunks
    preempted: tuple[Sequence, ...]  # lost their blocks this step; back in the waiting queue

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


def _priority_key(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival_time, seq.seq_id)


class _WaitingQueue:
    """FCFS (add order; preempted sequences go to the front) or a (priority, arrival) heap."""

    def __init__(self, priority: bool):
        self._priority = priority
        self._fifo: deque[Sequence] = deque()
        self._heap: list[tuple[tuple[int, float, int], int, Sequence]] = []
        self._count = 0  # heap tie-break, so Sequences are never compared

    def __len__(self) -> int:
        return len(self._heap) if self._priority else len(self._fifo)

    def push(self, seq: Sequence, front: bool = False) -> None:
        if self._priority:
            self._count += 1
            heapq.heappush(self._heap, (_priority_key(seq), self._count, seq))
        elif front:
            self._fifo.appendleft(seq)
        else:
            self._fifo.append(seq)

    def peek(self) -> Sequence:
        return self._heap[0][2] if self._priority else self._fifo[0]

    def pop(self) -> Sequence:
        return heapq.heappop(self._heap)[2] if self._priority else self._fifo.popleft()

    def remove_if(self, pred: Callable[[Sequence], bool]) -> list[Sequence]:
        """Take out, and return, every queued sequence that satisfies pred."""
        if self._priority:
            gone = [e[2] for e in self._heap if pred(e[2])]
            self._heap = [e for e in self._heap if not pred(e[2])]
            heapq.heapify(self._heap)
        else:
            gone = [s for s in self._fifo if pred(s)]
            self._fifo = deque(s for s in self._fifo if not pred(s))
        return gone


class Scheduler:
    """Decides, each step, which tokens of which sequences run.

    Running sequences are kept in service order (admission order, or (priority, arrival)
    order under "priority"). When blocks run out, one is preempted and later recomputed:
    under "fcfs" the newest not yet scheduled this step, under "priority" the least
    important, its chunk of this step taken back if it had one (as vLLM does).
    """

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self._waiting = _WaitingQueue(config.policy == "priority")
        self._running: list[Sequence] = []
        self._scoring_left = MAX_SCORED_TOKENS  # of the step being scheduled
        self.num_preemptions = 0  # sequences preempted for lack of blocks, so far

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def has_unfinished(self) -> bool:
        return bool(self._running) or len(self._waiting) > 0

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raise RequestTooLong if it could never be served."""
        self._check_fits(seq)
        seq.status = SequenceStatus.WAITING
        self._waiting.push(seq)

    def schedule(self) -> SchedulerOutput:
        self.block_manager.begin_step()
        self._scoring_left = MAX_SCORED_TOKENS
        chunks, preempted, budget = self._schedule_running(self.config.max_num_batched_tokens)
        # After a preemption the pool is tight: admitting more would only thrash.
        if not preempted:
            chunks += self._schedule_waiting(budget)
        chunks.sort(key=lambda c: c.num_tokens > 1)  # stable: decodes first, order kept
        return SchedulerOutput(tuple(chunks), tuple(preempted))

    def undo(self, output: SchedulerOutput) -> None:
        """Take back a step whose forward failed: the blocks it registered leave the prefix
        cache, and its sequences are preempted (computed again once rescheduled)."""
        seqs = {c.seq for c in output.chunks if c.seq.status is SequenceStatus.RUNNING}
        self.block_manager.unregister_fresh(seqs)
        for seq in reversed(self._running):  # pushed to the front: the first ends up first
            if seq in seqs:
                self._running.remove(seq)
                self._preempt(seq)

    def update(self, output: SchedulerOutput, sampled: dict[int, int]) -> None:
        """Record a finished step: chunks are computed; sampling chunks gain a token."""
        for chunk in output.chunks:
            seq = chunk.seq
            if seq.is_finished:  # aborted between schedule() and update()
                continue
            seq.num_computed_tokens += chunk.num_tokens
            if chunk.sample:
                seq.output_token_ids.append(sampled[seq.seq_id])

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (a no-op if it already ended); its blocks free at once."""
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self._waiting.remove_if(lambda s: s is seq)
        else:
            return
        self._release(seq, reason)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every live sequence of the request with "abort"; their blocks free at once."""
        seqs = [s for s in self._running if s.request_id == request_id]
        self._running = [s for s in self._running if s.request_id != request_id]
        seqs += self._waiting.remove_if(lambda s: s.request_id == request_id)
        for seq in seqs:
            self._release(seq, "abort")
        return seqs

    def _release(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.block_manager.free(seq)

    def _check_fits(self, seq: Sequence) -> None:
        cfg = self.config
        if seq.num_prompt_tokens == 0:
            raise ValueError(f"request {seq.request_id!r}: empty prompt")
        total = seq.num_prompt_tokens + seq.params.max_tokens
        prefix = (
            f"request {seq.request_id!r}: prompt ({seq.num_prompt_tokens} tokens) + "
            f"max_tokens ({seq.params.max_tokens}) = {total} tokens"
        )
        if total > cfg.max_model_len:
            raise RequestTooLong(f"{prefix}, more than max_model_len ({cfg.max_model_len})")
        capacity = cfg.num_blocks * cfg.block_size
        if total > capacity:
            raise RequestTooLong(
                f"{prefix}, more than the whole KV cache holds ({capacity} tokens: "
                f"{cfg.num_blocks} blocks of {cfg.block_size})"
            )

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledChunk], list[Sequence], int]:
        """Chunks for the running sequences, the sequences preempted, and the budget left."""
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        bs = self.config.block_size
        # (seq, tokens it has yet to compute), taken once: only preemption changes it this step.
        # A seq with all its max_tokens only waits for the last one's id (asynchronous steps).
        pending = [
            (s, s.num_tokens - s.num_computed_tokens)
            for s in self._running
            if s.num_output_tokens < s.params.max_tokens
        ]
        # Decodes before prefill chunks: a long prefill never starves the decoding sequences.
        decodes = [p for p in pending if p[1] == 1]
        prefills = [p for p in pending if p[1] > 1]
        for seq, num_left in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this step
                continue
            start = seq.num_computed_tokens
            num_new = self._scorable(seq, start, min(num_left, budget))
            if num_new == 0:
                continue
            # Most decodes land inside the seq's last block without filling it: the block
            # manager would have nothing to do (see BlockManager.allocate), so it is not asked.
            offset = start % bs  # into the last block; 0: that block is full, or there is none
            fits = 0 < offset < bs - num_new
            if not fits:
                fits, returned = self._make_room(seq, num_new, chunks, preempted)
                budget += returned
            if fits:
                chunks.append(self._chunk(seq, start, num_new))
                budget -= num_new
        return chunks, preempted, budget

    def _make_room(
        self,
        seq: Sequence,
        num_new: int,
        chunks: list[ScheduledChunk],
        preempted: list[Sequence],
    ) -> tuple[bool, int]:
        """Allocate for seq, preempting until it fits: under fcfs the newest running sequence
        not yet scheduled this step, under priority the least important running one, whose
        chunk (if it has one already) is taken back. (fits, tokens of budget given back);
        it does not fit when seq itself had to go."""
        returned = 0
        while not self.block_manager.allocate(seq, num_new):
            if self.config.policy == "priority":  # _running is in priority order
                victim = self._running[-1]
            else:
                scheduled = {c.seq for c in chunks}
                victim = next(s for s in reversed(self._running) if s not in scheduled)
            taken = [c for c in chunks if c.seq is victim]
            if taken:  # its forward will not run: what it registered this step goes too
                self.block_manager.unregister_fresh({victim})
                chunks.remove(taken[0])
                returned += taken[0].num_tokens
            self._running.remove(victim)
            self._preempt(victim)
            preempted.append(victim)
            self.num_preemptions += 1
            if self.num_preemptions % PREEMPTION_WARN_EVERY == 1:  # as vLLM: not every one
                logger.warning(
                    "request %s preempted for lack of KV-cache blocks (running: %d, "
                    "preemptions so far: %d); it will be recomputed. A larger KV cache "
                    "(--gpu-memory-utilization) or fewer sequences (--max-num-seqs) avoid it",
                    victim.request_id,
                    len(self._running),
                    self.num_preemptions,
                )
            if victim is seq:
                return False, returned
        return True, returned

    def _schedule_waiting(self, budget: int) -> list[ScheduledChunk]:
        chunks: list[ScheduledChunk] = []
        while len(self._waiting) and budget > 0 and len(self._running) < self.config.max_num_seqs:
            seq = self._waiting.peek()
            hit = self.block_manager.lookup(seq)
            num_new = min(seq.num_tokens - hit.num_tokens, budget)
            num_new = self._scorable(seq, hit.num_tokens, num_new)
            if num_new == 0 or not self.block_manager.allocate(seq, num_new, hit):
                break  # strict order: nobody overtakes the head of the queue
            self._waiting.pop()
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled is None:  # a preempted seq's queue time ends at its first
                seq.first_scheduled = time.monotonic()
            self._admit(seq)
            chunks.append(self._chunk(seq, seq.num_computed_tokens, num_new))
            budget -= num_new
        return chunks

    def _scorable(self, seq: Sequence, start: int, num_new: int) -> int:
        """num_new, cut so that the prompt tokens the chunk scores fit in what is left of the
        step's MAX_SCORED_TOKENS (0: none fit); the chunk's share is taken from it."""
        scored = _scored(seq, start, num_new)
        if scored > self._scoring_left:
            num_new = scored = self._scoring_left
        self._scoring_left -= scored
        return num_new

    def _admit(self, seq: Sequence) -> None:
        if self.config.policy == "priority":
            bisect.insort(self._running, seq, key=_priority_key)
        else:
            self._running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0  # recompute covers prompt + outputs so far
        seq.status = SequenceStatus.WAITING
        self._waiting.push(seq, front=True)

    @staticmethod
    def _chunk(seq: Sequence, start: int, num_tokens: int) -> ScheduledChunk:
        end = start + num_tokens
        return ScheduledChunk(
            seq, start, num_tokens, end == seq.num_tokens, _scored(seq, start, num_tokens)
        )


def _scored(seq: Sequence, start: int, num_tokens: int) -> int:
    """Prompt tokens the chunk [start, start + num_tokens) scores for prompt logprobs: each
    position before the prompt's last one scores the token after it."""
    if not seq.scores_prompt:
        return 0
    return max(0, min(start + num_tokens, seq.num_prompt_tokens - 1) - start)
