"""Scheduler scenarios and a randomized simulation against a fake model with a fake KV cache."""

import logging
import random
from types import SimpleNamespace

import pytest

from runtime.sampling_params import SamplingParams
from runtime.scheduler import RequestTooLong, Scheduler, SchedulerConfig, SchedulerOutput
from runtime.sequence import Sequence, SequenceStatus


def make_seq(seq_id, prompt, max_tokens=8, request_id=None, priority=0, arrival=None, params=None):
    prompt = (
        list(range(1000 * seq_id, 1000 * seq_id + prompt)) if isinstance(prompt, int) else prompt
    )
    return Sequence(
        seq_id,
        request_id or f"r{seq_id}",
        prompt,
        params or SamplingParams(max_tokens=max_tokens),
        arrival_time=float(seq_id if arrival is None else arrival),
        priority=priority,
    )


def next_token(token_ids: list[int]) -> int:
    """The fake model: a deterministic function of the whole history."""
    return hash(tuple(token_ids)) % 997


def step(sched: Scheduler) -> SchedulerOutput:
    """One engine step: schedule, 'run', update, finish sequences that reached max_tokens."""
    out = sched.schedule()
    sampled = {c.seq.seq_id: next_token(c.seq.token_ids) for c in out.chunks if c.sample}
    sched.update(out, sampled)
    for c in out.chunks:
        if c.sample and c.seq.num_output_tokens == c.seq.params.max_tokens:
            sched.finish(c.seq, "length")
    return out


def spans(out: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    return [(c.seq.seq_id, c.start, c.num_tokens, c.sample) for c in out.chunks]


def assert_idle(sched: Scheduler) -> None:
    bm = sched.block_manager
    assert not sched.has_unfinished()
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_total_blocks
    assert bm.usage == 0.0


def test_budget_is_filled_and_decodes_come_first():
    sched = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, max_num_batched_tokens=64))
    for i in range(4):
        sched.add(make_seq(i, 20))
    out = step(sched)
    assert spans(out) == [(0, 0, 20, True), (1, 0, 20, True), (2, 0, 20, True), (3, 0, 4, False)]
    sched.add(make_seq(4, 50))
    out = step(sched)
    assert spans(out) == [
        (0, 20, 1, True),
        (1, 20, 1, True),
        (2, 20, 1, True),
        (3, 4, 16, True),
        (4, 0, 45, False),
    ]
    assert out.num_batched_tokens == 64
    out = step(sched)
    assert spans(out)[:4] == [(i, 21, 1, True) for i in range(3)] + [(3, 20, 1, True)]
    assert spans(out)[4] == (4, 45, 5, True)


def test_decodes_get_the_budget_before_a_higher_priority_prefill():
    cfg = SchedulerConfig(
        num_blocks=100, block_size=4, max_num_batched_tokens=16, policy="priority"
    )
    sched = Scheduler(cfg)
    low, high = make_seq(0, 3, priority=1), make_seq(1, 40, priority=0)
    sched.add(low)
    assert spans(step(sched)) == [(0, 0, 3, True)]
    sched.add(high)
    assert spans(step(sched)) == [(0, 3, 1, True), (1, 0, 15, False)]
    assert spans(step(sched)) == [(0, 4, 1, True), (1, 15, 15, False)]


@pytest.mark.parametrize(("prompt", "budget"), [(100, 32), (97, 7), (5, 5), (33, 16)])
def test_chunked_prefill_samples_exactly_once_at_the_end(prompt, budget):
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=16, max_num_batched_tokens=budget))
    seq = make_seq(0, prompt, max_tokens=3)
    sched.add(seq)
    pos, samples = 0, 0
    while pos < prompt:
        out = step(sched)
        (chunk,) = out.chunks
        assert chunk.start == pos and chunk.num_tokens == min(budget, prompt - pos)
        pos += chunk.num_tokens
        samples += chunk.sample
        assert chunk.sample == (pos == prompt)
        assert seq.num_output_tokens == samples
    assert samples == 1 and seq.output_token_ids == [next_token(seq.prompt_token_ids)]
    assert spans(step(sched)) == [(0, prompt, 1, True)]


def test_scored_prompt_tokens_per_step_are_capped(monkeypatch):
    monkeypatch.setattr("runtime.scheduler.MAX_SCORED_TOKENS", 10)
    sched = Scheduler(SchedulerConfig(num_blocks=100, block_size=4, max_num_batched_tokens=64))
    for i in range(2):
        sched.add(make_seq(i, 12, params=SamplingParams(max_tokens=2, prompt_logprobs=1)))
    sched.add(make_seq(2, 12))
    # positions 0..10 of a 12-token prompt score a token, 10 a step; the queue keeps its
    # order: the unscored prompt waits behind the second scored one
    out = step(sched)
    assert spans(out) == [(0, 0, 10, False)]
    assert [c.prompt_logits for c in out.chunks] == [10]
    out = step(sched)
    assert spans(out) == [(0, 10, 2, True), (1, 0, 9, False), (2, 0, 12, True)]
    assert [c.prompt_logits for c in out.chunks] == [1, 9, 0]
    out = step(sched)
    assert spans(out) == [(0, 12, 1, True), (2, 12, 1, True), (1, 9, 3, True)]
    assert [c.prompt_logits for c in out.chunks] == [0, 0, 2]


def test_max_num_seqs():
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_seqs=2))
    seqs = [make_seq(i, 5, max_tokens=2) for i in range(3)]
    for seq in seqs:
        sched.add(seq)
    assert [c.seq for c in step(sched).chunks] == seqs[:2]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    step(sched)  # both reach max_tokens=2 and finish
    assert [c.seq for c in step(sched).chunks] == seqs[2:]
    step(sched)
    assert_idle(sched)


def test_preempts_the_newest_and_recomputes_it_first():
    cfg = SchedulerConfig(num_blocks=6, block_size=4, max_num_seqs=2, enable_prefix_caching=False)
    sched = Scheduler(cfg)
    a, b, c = make_seq(0, 8, max_tokens=12), make_seq(1, 8, max_tokens=12), make_seq(2, 4, 2)
    for seq in (a, b, c):
        sched.add(seq)
    for _ in range(5):  # prefill, then decodes at positions 8..11: 6 blocks in use
        assert not step(sched).preempted
    assert sched.block_manager.num_free_blocks == 0
    out = step(sched)  # a needs a 4th block at position 12
    assert out.preempted == (b,) and spans(out) == [(0, 12, 1, True)]
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0
    assert b.block_table == [] and b.num_output_tokens == 5  # outputs kept
    assert (sched.num_running, sched.num_waiting) == (1, 2)
    while not a.is_finished:
        assert all(s.seq is a for s in step(sched).chunks)
    out = step(sched)  # b, ahead of c: recompute of prompt + 5 outputs, then sample
    assert spans(out) == [(1, 0, 13, True), (2, 0, 4, True)]
    while sched.has_unfinished():
        step(sched)
    for seq in (a, b, c):
        ref = list(seq.prompt_token_ids)
        for _ in range(seq.params.max_tokens):
            ref.append(next_token(ref))
        assert seq.token_ids == ref and seq.finish_reason == "length"
    assert_idle(sched)


def test_preemptions_are_counted_and_warned_of_and_first_admissions_kept(caplog, monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr("runtime.scheduler.time", SimpleNamespace(monotonic=lambda: clock.now))
    cfg = SchedulerConfig(num_blocks=6, block_size=4, max_num_seqs=2, enable_prefix_caching=False)
    sched = Scheduler(cfg)
    a, b, c = make_seq(0, 8, max_tokens=12), make_seq(1, 8, max_tokens=12), make_seq(2, 4, 2)
    for seq in (a, b, c):
        sched.add(seq)
    readmitted = None
    with caplog.at_level(logging.WARNING, logger="runtime.scheduler"):
        while sched.has_unfinished():
            clock.now += 1
            out = step(sched)
            if sched.num_preemptions and any(s.seq is b and s.start == 0 for s in out.chunks):
                readmitted = clock.now
    assert sched.num_preemptions == 1  # b, at step 6 (as in the test above)
    assert [r.getMessage() for r in caplog.records] == [
        "request r1 preempted for lack of KV-cache blocks (running: 1, preemptions so far: 1); "
        "it will be recomputed. A larger KV cache (--gpu-memory-utilization) or fewer "
        "sequences (--max-num-seqs) avoid it"
    ]
    # b's queue time ends at its first admission, not at its readmission with c
    assert (a.first_scheduled, b.first_scheduled) == (1, 1)
    assert readmitted == c.first_scheduled > 6


def test_newest_needing_a_block_preempts_itself():
    sched = Scheduler(SchedulerConfig(num_blocks=5, block_size=4, enable_prefix_caching=False))
    a, b = make_seq(0, 8, max_tokens=8), make_seq(1, 5, max_tokens=8)
    sched.add(a)
    sched.add(b)
    for _ in range(4):
        assert not step(sched).preempted
    out = step(sched)  # b reaches position 8 with all 5 blocks in use
    assert out.preempted == (b,) and spans(out) == [(0, 11, 1, True)]
    assert a.status is SequenceStatus.RUNNING and len(a.block_table) == 3
    assert sched.block_manager.num_free_blocks == 2
    assert [c.seq for c in step(sched).chunks] == [a]  # the pool is short: b waits


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", 1), ("priority", 0)])
def test_victim_is_the_newest_or_the_least_important(policy, victim):
    cfg = SchedulerConfig(num_blocks=6, block_size=4, enable_prefix_caching=False, policy=policy)
    sched = Scheduler(cfg)
    old_low = make_seq(0, 8, max_tokens=12, priority=1)
    new_high = make_seq(1, 8, max_tokens=12, priority=0)
    sched.add(old_low)
    step(sched)
    sched.add(new_high)
    for _ in range(4):
        assert not step(sched).preempted
    out = step(sched)  # old_low reaches position 12 with all 6 blocks in use
    assert [s.seq_id for s in out.preempted] == [victim]
    assert [c.seq.seq_id for c in out.chunks] == [1 - victim]


def test_request_too_long_is_rejected_with_the_numbers():
    sched = Scheduler(SchedulerConfig(num_blocks=4, block_size=4, max_model_len=64))
    with pytest.raises(RequestTooLong, match=r"prompt \(60 tokens\) \+ max_tokens \(8\) = 68.*64"):
        sched.add(make_seq(0, 60, max_tokens=8))
    with pytest.raises(RequestTooLong, match=r"= 20 tokens.*16 tokens: 4 blocks of 4"):
        sched.add(make_seq(1, 10, max_tokens=10))
    assert not sched.has_unfinished()
    sched.add(make_seq(2, 10, max_tokens=6))  # exactly the pool
    while sched.has_unfinished():
        step(sched)
    assert_idle(sched)


def test_abort_frees_blocks_at_once():
    sched = Scheduler(SchedulerConfig(num_blocks=32, block_size=4, max_num_seqs=3))
    pair = [make_seq(i, 9, request_id="r") for i in range(2)]
    other, queued = make_seq(2, 6), make_seq(3, 6, request_id="r")
    for seq in [*pair, other, queued]:
        sched.add(seq)
    step(sched)
    assert sched.num_waiting == 1
    out = sched.schedule()
    assert set(sched.abort("r")) == {*pair, queued}  # running ones and the queued one
    for seq in (*pair, queued):
        assert seq.status is SequenceStatus.FINISHED and seq.finish_reason == "abort"
        assert seq.block_table == []
    assert (sched.num_running, sched.num_waiting) == (1, 0)
    bm = sched.block_manager
    assert bm.num_total_blocks - bm.num_free_blocks - bm.num_evictable_blocks == 2
    sched.update(out, {c.seq.seq_id: 7 for c in out.chunks})  # aborted mid-step: skipped
    assert [s.num_output_tokens for s in pair] == [1, 1] and other.num_output_tokens == 2
    assert sched.abort("r") == [] and sched.abort("missing") == []
    sched.abort(other.request_id)
    assert_idle(sched)


@pytest.mark.parametrize(
    ("policy", "expected"), [("priority", [1, 3, 2, 0]), ("fcfs", [0, 1, 2, 3])]
)
def test_admission_order(policy, expected):
    cfg = SchedulerConfig(num_blocks=32, block_size=4, max_num_seqs=1, policy=policy)
    sched = Scheduler(cfg)
    for seq_id, prio in enumerate([2, 0, 1, 0]):
        sched.add(make_seq(seq_id, 4, max_tokens=1, priority=prio))
    order = [step(sched).chunks[0].seq.seq_id for _ in range(4)]
    assert order == expected
    assert_idle(sched)


@pytest.mark.parametrize("same_step", [True, False])
def test_shared_prefix_schedules_only_the_suffix(same_step):
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=16))
    prefix = [random.Random(3).randrange(30_000) for _ in range(64)]
    a, b = make_seq(0, [*prefix, 1, 2, 3]), make_seq(1, [*prefix, 9, 8])
    sched.add(a)
    if not same_step:
        step(sched)
    sched.add(b)
    out = step(sched)
    assert spans(out)[-1] == (1, 64, 2, True)
    assert b.num_cached_tokens == 64 and a.num_cached_tokens == 0
    assert b.block_table[:4] == a.block_table[:4]


def test_a_block_filled_by_a_decode_is_cached_in_that_step():
    # Decodes that stay inside a block skip the block manager; the one that fills it must not.
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4))
    a = make_seq(0, 5, max_tokens=8)
    sched.add(a)
    for _ in range(3):
        step(sched)
    assert (a.num_tokens, a.num_computed_tokens) == (8, 7)
    b = make_seq(1, [*a.token_ids, 999])
    sched.add(b)
    out = step(sched)  # a's decode fills its second block, then b looks it up
    assert spans(out) == [(0, 7, 1, True), (1, 8, 1, True)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]


class FakeModel:
    """Checks that every chunk sees exactly its own prefix's K/V through its block table."""

    def __init__(self, block_size: int):
        self.bs = block_size
        self.slots: dict[tuple[int, int], int] = {}

    def run(self, out: SchedulerOutput) -> dict[int, int]:
        for c in out.chunks:  # every layer writes all K/V before attention reads it
            ids, table = c.seq.token_ids, c.seq.block_table
            for p in range(c.start, c.start + c.num_tokens):
                self.slots[table[p // self.bs], p % self.bs] = hash(tuple(ids[: p + 1]))
        for c in out.chunks:
            ids, table = c.seq.token_ids, c.seq.block_table
            for p in range(c.start + c.num_tokens):
                assert self.slots[table[p // self.bs], p % self.bs] == hash(tuple(ids[: p + 1]))
        return {c.seq.seq_id: next_token(c.seq.token_ids) for c in out.chunks if c.sample}


def check_step(sched: Scheduler, out: SchedulerOutput, before: dict[int, int]) -> None:
    cfg = sched.config
    assert out.num_batched_tokens <= cfg.max_num_batched_tokens
    assert len(out.chunks) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    ids = [c.seq.seq_id for c in out.chunks]
    assert len(set(ids)) == len(ids)
    assert not set(ids) & {s.seq_id for s in out.preempted}
    sizes = [c.num_tokens for c in out.chunks]
    assert sizes == sorted(sizes, key=lambda n: n > 1)  # decodes first
    for c in out.chunks:
        assert c.start == before.get(c.seq.seq_id, c.seq.num_computed_tokens)
        assert c.sample == (c.start + c.num_tokens == c.seq.num_tokens)


def simulate(seed: int, aborts: bool, policy: str, caching: bool) -> dict[str, int]:
    rng = random.Random(seed)
    bs = rng.choice([2, 4])
    cfg = SchedulerConfig(
        num_blocks=rng.randint(6, 12),
        block_size=bs,
        max_num_seqs=rng.randint(2, 6),
        max_num_batched_tokens=rng.randint(6, 40),
        max_model_len=40,
        enable_prefix_caching=caching,
        policy=policy,
    )
    sched, model = Scheduler(cfg), FakeModel(bs)
    families = [[rng.randrange(997) for _ in range(20)] for _ in range(3)]
    pending, live, done, next_id, stats = list(range(40)), [], [], 0, {"preempted": 0}
    for _ in range(5000):
        while pending and rng.random() < 0.3:
            req = pending.pop()
            fam = rng.choice(families)
            prompt = fam[: rng.randint(0, 20)] + [
                rng.randrange(997) for _ in range(rng.randint(1, 12))
            ]
            max_tokens, n = rng.randint(1, 24), rng.choice([1, 1, 2])
            for index in range(n):
                seq = make_seq(next_id, prompt, max_tokens, f"q{req}", rng.randint(0, 2), next_id)
                seq.index, next_id = index, next_id + 1
                if len(prompt) + max_tokens > min(cfg.num_blocks * bs, cfg.max_model_len):
                    with pytest.raises(RequestTooLong):
                        sched.add(seq)
                    continue
                sched.add(seq)
                live.append(seq)
        if aborts and live and rng.random() < 0.05:
            victims = sched.abort(rng.choice(live).request_id)
            assert victims and all(s.finish_reason == "abort" for s in victims)
        out = sched.schedule()
        before = {c.seq.seq_id: c.seq.num_computed_tokens for c in out.chunks}
        check_step(sched, out, before)
        stats["preempted"] += len(out.preempted)
        sched.update(out, model.run(out))
        for c in out.chunks:
            if c.sample and c.seq.num_output_tokens == c.seq.params.max_tokens:
                sched.finish(c.seq, "length")
        done += [s for s in live if s.is_finished]
        live = [s for s in live if not s.is_finished]
        held = {b for s in live for b in s.block_table}
        bm = sched.block_manager
        assert len(held) + bm.num_free_blocks + bm.num_evictable_blocks == cfg.num_blocks
        if not pending and not sched.has_unfinished():
            break
    assert not live and not pending, "simulation did not drain"
    assert_idle(sched)
    for seq in done:
        if seq.finish_reason == "length":
            ref = list(seq.prompt_token_ids)
            for _ in range(seq.params.max_tokens):
                ref.append(next_token(ref))
            assert seq.token_ids == ref
        else:
            assert seq.finish_reason == "abort" and seq.num_output_tokens < seq.params.max_tokens
    stats["aborted"] = sum(s.finish_reason == "abort" for s in done)
    stats["prefix_hits"] = sched.block_manager.prefix_hits
    return stats


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("aborts", [False, True])
@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_simulation_finishes_every_request(policy, aborts, caching):
    runs = [simulate(seed, aborts, policy, caching) for seed in range(10)]
    # The pools are tiny: preemption and recompute must have been exercised.
    assert sum(r["preempted"] for r in runs) > 20
    assert (sum(r["aborted"] for r in runs) > 0) == aborts
    assert (sum(r["prefix_hits"] for r in runs) > 0) == caching


def test_priority_preempts_the_least_important_even_if_already_scheduled():
    # low (priority 1) decodes; high (priority 0) prefills in chunks and runs out of blocks:
    # low goes (its decode chunk taken back), not high itself (as vLLM's priority scheduler)
    cfg = SchedulerConfig(
        num_blocks=7,
        block_size=4,
        max_num_batched_tokens=5,
        enable_prefix_caching=False,
        policy="priority",
    )
    sched = Scheduler(cfg)
    low, high = make_seq(0, 4, max_tokens=20, priority=1), make_seq(1, 24, max_tokens=4, priority=0)
    sched.add(low)
    step(sched)
    sched.add(high)
    victims = []
    while high.num_output_tokens == 0:
        out = step(sched)
        victims += [s.seq_id for s in out.preempted]
        assert all(c.seq is not low for c in out.chunks) or low not in out.preempted
    assert victims and set(victims) == {0}  # only ever the low-priority one
    while sched.has_unfinished():
        step(sched)
    assert_idle(sched)
