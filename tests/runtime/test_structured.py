"""Structured outputs on SmolLM2 (float32, CPU): sampled at temperature 1, every output
matches its JSON schema, regex, choice or grammar, where the same sampling unconstrained
does not; in batches with unconstrained requests, which it leaves unchanged."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import threading

import pytest
import torch
from conftest import record_preemptions, tiny_model

import kiln
from runtime.async_engine import AsyncEngine, ThreadCore
from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.engine_process import ProcessCore
from runtime.sampler import SamplingState, sample
from runtime.structured import MAX_JSON_WHITESPACE, Grammars, unpack_bitmask

xgrammar = pytest.importorskip("xgrammar")
pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def matches_schema(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"city", "population"}
        and isinstance(value["city"], str)
        and type(value["population"]) is int
    )


def is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


CASES = [  # (spec, check)
    (kiln.StructuredOutputs(json=SCHEMA), matches_schema),
    (kiln.StructuredOutputs(json_object=True), is_object),
    (kiln.StructuredOutputs(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
    (kiln.StructuredOutputs(choice=["Paris", "Lyon"]), lambda t: t in ("Paris", "Lyon")),
    (
        kiln.StructuredOutputs(grammar='root ::= ("yes" | "no") ", " [a-z]+'),
        lambda t: re.fullmatch(r"(yes|no), [a-z]+", t),
    ),
]
PROMPT = "Tell me about the capital of France."


@pytest.fixture(scope="module")
def llm(smollm2_artifact):
    with kiln.LLM(smollm2_artifact, num_kv_blocks=256) as llm:
        yield llm


def sampled(spec=None, seed=0, n=2, max_tokens=48):
    return kiln.SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed, n=n, structured_outputs=spec
    )


@pytest.mark.parametrize("spec, check", CASES, ids=["schema", "object", "regex", "choice", "ebnf"])
def test_sampled_outputs_match_their_spec(llm, spec, check):
    outs = llm.generate([PROMPT] * 2, [sampled(spec, seed=s) for s in (1, 2)], use_tqdm=False)
    texts = [c.text for out in outs for c in out.outputs]
    assert all(check(t) for t in texts), texts
    # ended by the grammar (its stop token), or cut at max_tokens right where it completes
    for c in (c for out in outs for c in out.outputs):
        assert c.finish_reason == "stop" or len(c.token_ids) == 48
    free = llm.generate([PROMPT] * 2, [sampled(None, seed=s) for s in (1, 2)], use_tqdm=False)
    assert not all(check(c.text) for out in free for c in out.outputs)  # the check can fail


@pytest.fixture
def llm_each_mode(smollm2_artifact, scheduling):
    """An LLM with synchronous steps, then one with asynchronous steps."""
    with kiln.LLM(smollm2_artifact, num_kv_blocks=256, async_scheduling=scheduling) as llm:
        yield llm


def test_constrained_requests_leave_a_batch_unchanged(llm_each_mode):
    llm = llm_each_mode
    greedy = kiln.SamplingParams(max_tokens=12, temperature=0.0)
    prompts = ["The capital of France is", "1, 2, 3,", PROMPT]
    alone = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
    params = [greedy, sampled(CASES[0][0], seed=3, n=1), greedy, sampled(CASES[2][0], n=1)]
    outs = llm.generate([prompts[0], PROMPT, prompts[1], PROMPT], params, use_tqdm=False)
    assert [outs[0].token_ids, outs[2].token_ids] == alone[:2]
    assert matches_schema(outs[1].text) and CASES[2][1](outs[3].text)


def test_a_schemas_properties_come_in_its_order(llm):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    params = kiln.SamplingParams(
        max_tokens=40, temperature=0.0, structured_outputs=kiln.StructuredOutputs(json=schema)
    )
    out = llm.generate(["A person as JSON:"], params, use_tqdm=False)[0]
    assert list(json.loads(out.text)) == ["name", "age"]


def test_a_choice_outside_the_basic_plane_can_be_produced(llm):
    spec = kiln.StructuredOutputs(choice=["🎉 yes", "ü"])
    outs = llm.generate([PROMPT] * 3, [sampled(spec, seed=s) for s in range(3)], use_tqdm=False)
    texts = {c.text for out in outs for c in out.outputs}
    assert texts == {"🎉 yes", "ü"}


def test_preempted_constrained_sequences_resume_their_grammar(smollm2_artifact):
    spec = CASES[0][0]
    params = [sampled(spec, seed=s, n=1, max_tokens=40) for s in range(6)]
    with kiln.LLM(smollm2_artifact, num_kv_blocks=256) as roomy:
        expected = [o.text for o in roomy.generate([PROMPT] * 6, params, use_tqdm=False)]
    with kiln.LLM(smollm2_artifact, num_kv_blocks=6, max_num_batched_tokens=64) as tight:
        preempted = record_preemptions(tight.engine)
        outs = tight.generate([PROMPT] * 6, params, use_tqdm=False)
    assert preempted, "the pool was meant to be too small"
    assert [o.text for o in outs] == expected


def test_asynchronous_steps_keep_grammars_in_step(smollm2_artifact):
    # each grammar takes its sequence's token once it lands, before the next step's mask;
    # seeded sampling: the same outputs as synchronous steps, with steps overlapping; in a
    # pool small enough to preempt, with plain requests and choices ending mid-batch
    specs = [c[0] for c in CASES] + [None]
    params = [sampled(spec, seed=s, n=1, max_tokens=32) for s, spec in enumerate(specs)]
    prompts = [PROMPT] * len(params)
    runs = {}
    for overlap in (False, True):
        with kiln.LLM(
            smollm2_artifact, num_kv_blocks=6, max_num_batched_tokens=64, async_scheduling=overlap
        ) as llm:
            step, overlapped = llm.engine.step, []

            def recording(step=step, engine=llm.engine, overlapped=overlapped):
                updates = step()  # a constrained sequence's token left in flight?
                flight = engine._in_flight.seqs if engine._in_flight else []
                overlapped.append(any(s.params.structured_outputs for _, s in flight))
                return updates

            llm.engine.step = recording
            preempted = record_preemptions(llm.engine)
            runs[overlap] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert preempted, "the pool was meant to be too small"
        assert any(overlapped) == overlap
    assert [(o.text, o.finish_reason) for o in runs[True]] == [
        (o.text, o.finish_reason) for o in runs[False]
    ]
    ended = [(check, o) for (_, check), o in zip(CASES, runs[True]) if o.finish_reason == "stop"]
    assert len(ended) >= 3 and all(check(o.text) for check, o in ended)


class Refusing:
    """A matcher that allows every token and then refuses the one picked."""

    def fill_next_token_bitmask(self, bitmask, row):
        bitmask[row] = -1

    def accept_token(self, token):
        return False

    def is_terminated(self):
        return False


def test_a_token_its_grammar_refuses_is_flagged():
    params = kiln.SamplingParams(temperature=0.0)
    states = [
        SamplingState(params, [0], [], (), None, Refusing()),
        SamplingState(params, [0], [], (), None),
    ]
    for state, token in zip(states, sample(torch.randn(2, 40), states)):
        state.accept(token.token_id)  # as the engine does with each token it records
    assert [s.grammar_refused for s in states] == [True, False]


def test_a_refused_token_ends_its_output_and_nothing_else(llm_each_mode, monkeypatch, caplog):
    llm, make = llm_each_mode, Grammars.matcher

    def refusing_third(self, spec):  # a real matcher that refuses the third token picked
        matcher, taken = make(self, spec), []

        class Third:
            def fill_next_token_bitmask(self, bitmask, row):
                matcher.fill_next_token_bitmask(bitmask, row)

            def accept_token(self, token):
                taken.append(token)
                return len(taken) < 3 and matcher.accept_token(token)

            def is_terminated(self):
                return matcher.is_terminated()

        return Third()

    plain = kiln.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    expected = llm.generate([PROMPT], plain, use_tqdm=False)[0].token_ids
    monkeypatch.setattr(Grammars, "matcher", refusing_third)
    spec = kiln.StructuredOutputs(regex=r"[a-z ]{20}")
    outs = llm.generate([PROMPT] * 2, [sampled(spec, n=1), plain], use_tqdm=False)
    # the refused token is the last: the output stops there; the batch's other request runs on
    assert len(outs[0].token_ids) == 3 and outs[0].outputs[0].finish_reason == "stop"
    assert re.fullmatch(r"[a-z ]*", outs[0].outputs[0].text)
    assert outs[1].token_ids == expected
    assert "its grammar allowed no token" in caplog.text
    bm = llm.engine.scheduler.block_manager
    assert bm.num_free_blocks + bm.num_evictable_blocks == bm.num_total_blocks


@pytest.mark.parametrize("spec", [CASES[0][0], CASES[1][0]], ids=["schema", "object"])
def test_json_whitespace_runs_are_bounded(llm, spec):
    # a model may pad its JSON with whitespace till max_tokens; a run longer than the cap
    # is refused, a newline and an indent are not
    for run, ok in ((MAX_JSON_WHITESPACE, True), (MAX_JSON_WHITESPACE + 1, False)):
        matcher = llm.engine._grammars().matcher(spec)
        assert matcher.accept_string("{" + " " * run) == ok
    deep = {"a": {"b": {"c": {"d": {"e": {"f": {"g": 1}}}}}}}
    for text in ('{\n    "city": "Paris",\n    "population": 1\n}', json.dumps(deep, indent=4)):
        matcher = llm.engine._grammars().matcher(CASES[1][0])  # any object
        assert matcher.accept_string(text), text


def test_an_output_cut_by_max_tokens_ends_with_length(llm):
    out = llm.generate([PROMPT], sampled(CASES[0][0], n=1, max_tokens=3), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and len(out.token_ids) == 3


@pytest.mark.parametrize(
    "spec, message",
    [
        (kiln.StructuredOutputs(json={"type": "bogus"}), 'outputs: Unsupported type "bogus"'),
        (kiln.StructuredOutputs(regex="("), "parenthesis is not closed"),
        (kiln.StructuredOutputs(grammar="root ::= "), "structured outputs: "),
    ],
)
def test_specs_that_do_not_compile_are_refused_and_nothing_is_queued(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.engine.add_request("bad", [1, 2, 3], sampled(spec))
    assert not llm.engine.requests and not llm.engine.has_unfinished()


def test_a_served_request_compiles_its_grammar_off_the_engine_thread(smollm2_artifact, monkeypatch):
    calls = []  # per compile: its thread, and whether xgrammar's cache grew (it compiled)
    compile_spec = Grammars.compile

    def recorded(self, spec):
        before = self._compiler.get_cache_size_bytes()
        try:
            return compile_spec(self, spec)
        finally:
            grew = self._compiler.get_cache_size_bytes() > before
            calls.append((threading.current_thread().name != "kiln-engine", grew))

    monkeypatch.setattr(Grammars, "compile", recorded)
    engine = AsyncEngine(ThreadCore(kiln.LLM(smollm2_artifact, num_kv_blocks=64).engine))
    regex = r"[a-z]{4}-\d{3}"
    schema = {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(9)}}

    async def run():
        texts = []
        for spec in (kiln.StructuredOutputs(regex=regex), kiln.StructuredOutputs(json=schema)):
            stream = engine.generate(spec.regex or "schema", [1, 2, 3], sampled(spec, n=1))
            texts.append("".join([u.outputs[0].text async for u in stream]))
        with pytest.raises(ValueError, match="parenthesis is not closed"):  # never queued
            async for _ in engine.generate(
                "bad", [1, 2, 3], sampled(kiln.StructuredOutputs(regex="("))
            ):
                pass
        assert engine.is_alive
        await engine.shutdown(timeout=1)
        return texts

    texts = asyncio.run(run())
    assert re.fullmatch(regex, texts[0]) and texts[1].startswith("{")  # 48 tokens: a prefix
    # each spec compiled off the engine thread; there, its matcher found it compiled (the
    # cache did not grow); the bad regex never reached the engine
    assert calls == [(True, True), (False, False), (True, True), (False, False), (True, False)]


def test_an_engine_process_compiles_grammars_and_refuses_bad_ones(smollm2_artifact):
    config = EngineConfig(num_kv_blocks=64)
    front = AsyncEngine(ProcessCore(functools.partial(Engine.load, smollm2_artifact, config)))
    regex = r"[a-z]{4}-\d{3}"

    async def run():
        spec = kiln.StructuredOutputs(regex=regex)
        stream = front.generate("r", [1, 2, 3], sampled(spec, n=1))
        text = "".join([u.outputs[0].text async for u in stream])
        with pytest.raises(ValueError, match="parenthesis is not closed"):
            async for _ in front.generate(
                "bad", [1, 2, 3], sampled(kiln.StructuredOutputs(regex="("))
            ):
                pass
        # a client that leaves while its grammar compiles: the compile's reply finds no one
        leaving = kiln.StructuredOutputs(regex=r"[0-9]{3}-[a-f]{7}")
        request = asyncio.create_task(anext(front.generate("gone", [1], sampled(leaving))))
        await asyncio.sleep(0)  # it sent the compile and waits for the reply
        request.cancel()
        stream = front.generate("next", [1, 2, 3], sampled(leaving, n=1))
        after = "".join([u.outputs[0].text async for u in stream])
        assert re.fullmatch(leaving.regex, after)
        assert front.is_alive
        await front.shutdown(timeout=1)
        return text

    assert re.fullmatch(regex, asyncio.run(run()))
    assert front.core.exitcode == 0


def slow_compiles(engine, release: threading.Event) -> None:
    """Make the engine's grammar compiles wait for `release`."""
    compile_grammar = engine.compile_grammar

    def waiting(spec):
        release.wait(10)
        return compile_grammar(spec)

    engine.compile_grammar = waiting


def test_a_shutdown_waits_for_a_request_compiling_its_grammar(smollm2_artifact):
    engine = AsyncEngine(ThreadCore(kiln.LLM(smollm2_artifact, num_kv_blocks=64).engine))
    release = threading.Event()
    slow_compiles(engine.core.engine, release)
    spec = kiln.StructuredOutputs(regex=r"[a-z]{5}")

    async def run():
        async def one():
            return [u async for u in engine.generate("r", [1, 2, 3], sampled(spec, n=1))]

        request = asyncio.create_task(one())
        await asyncio.sleep(0.2)  # compiling
        drain = asyncio.create_task(engine.shutdown(timeout=10))
        await asyncio.sleep(0.2)
        release.set()
        updates = await asyncio.wait_for(request, 10)
        await drain
        return updates

    updates = asyncio.run(run())
    assert updates[-1].finished and updates[-1].outputs[0].finish_reason == "stop"
    assert re.fullmatch(r"[a-z]{5}", "".join(u.outputs[0].text for u in updates))


def test_an_engine_dying_during_a_compile_fails_the_request(smollm2_artifact):
    llm = kiln.LLM(smollm2_artifact, num_kv_blocks=64)
    engine = AsyncEngine(ThreadCore(llm.engine))
    release = threading.Event()
    slow_compiles(llm.engine, release)

    def broken(*args, **kwargs):
        raise RuntimeError("the device fell over")

    async def run():
        spec = kiln.StructuredOutputs(regex=r"[a-z]{5}")
        waiting = asyncio.create_task(
            anext(engine.generate("r", [1, 2, 3], sampled(spec, n=1)).__aiter__())
        )
        await asyncio.sleep(0.2)  # compiling; then another request kills the engine
        llm.engine.runner.execute = broken
        with pytest.raises(RuntimeError, match="the engine died"):
            await anext(engine.generate("x", [4, 5], sampled(n=1)))
        release.set()
        with pytest.raises(RuntimeError, match="the engine died"):  # not left waiting
            await asyncio.wait_for(waiting, 10)

    asyncio.run(run())


def test_a_model_without_tokenizer_refuses_structured_outputs(tmp_path):
    art = kiln.compile(tiny_model("qwen3"), tmp_path / "art")
    engine = kiln.LLM(art, num_kv_blocks=16).engine
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.add_request("r", [1, 2], sampled(CASES[1][0]))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({}, "set exactly one of json, json_object, regex, choice, grammar (got none)"),
        ({"regex": "a", "choice": ["a"]}, "(got regex, choice)"),
        ({"regex": 5}, "regex must be a string"),
        ({"choice": "ab"}, "choice must be a list of strings"),
        ({"choice": ["a", ""]}, "choice must be non-empty strings"),
        ({"json_object": 1}, "json_object must be a boolean"),
    ],
)
def test_invalid_specs_are_refused(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        kiln.StructuredOutputs(**fields)


def test_a_schema_given_as_a_dict_is_a_hashable_string_in_its_order():
    a = kiln.StructuredOutputs(json={"b": 1, "a": 2})
    assert {a: 1}[kiln.StructuredOutputs(json='{"b": 1, "a": 2}')] == 1
    with pytest.raises(ValueError, match="min_tokens"):
        kiln.SamplingParams(min_tokens=2, structured_outputs=a)
    given = kiln.SamplingParams(structured_outputs={"regex": "a+"})  # a dict is taken too
    assert given.structured_outputs == kiln.StructuredOutputs(regex="a+")


@pytest.mark.parametrize("vocab", [31, 32, 33, 1000, 49157])
def test_unpacked_bitmask_masks_as_xgrammar_does(vocab):
    g = torch.Generator().manual_seed(vocab)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, -(-vocab // 32)), generator=g)
    bitmask = bitmask.to(torch.int32)
    logits = torch.randn(3, vocab, generator=g)
    theirs = logits.clone()
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask)
    ours = logits.masked_fill(~unpack_bitmask(bitmask, vocab), -torch.inf)
    assert torch.equal(ours, theirs)
