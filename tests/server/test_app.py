"""The server on a loopback port, driven by the official `openai` client, against a fake engine."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from conftest import smollm2_tokenizer
from fake_engine import EngineDeadError, FakeEngine, echo_token
from prometheus_client.parser import text_string_to_metric_families
from serving import free_port

from server import ServerConfig, create_app, serve
from server.app import STATE

KEY = "sk-kiln-test"
NAME = "smol-served"
MAX_LEN = 256
FOX = "The quick brown fox jumps over the lazy dog"
HELLO = [{"role": "user", "content": "Say hello."}]
# characters split over SmolLM2 tokens: CJK (3 tokens for 界), an accent, an emoji
SPLIT = " 世界! über 🎉"


@contextlib.contextmanager
def live_server(engine: FakeEngine, config: ServerConfig) -> Iterator[str]:
    """create_app(engine, config) on a free loopback port, its loop on a background thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(10)

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_app(engine, config), handler_cancellation=True)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = call(start())
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        call(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def engine(tok) -> FakeEngine:
    return FakeEngine(tok, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def url(engine: FakeEngine) -> Iterator[str]:
    config = ServerConfig(served_model_name=NAME, api_key=KEY, max_body_bytes=64 << 10, max_n=4)
    with live_server(engine, config) as base:
        yield base


@pytest.fixture(autouse=True)
def fresh_engine(engine: FakeEngine) -> None:
    engine.reset()


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=10)


def http(url: str, path: str, body=None, method: str = "POST", key: str | None = KEY,
         headers: dict | None = None) -> tuple[int, bytes, dict]:  # fmt: skip
    """A plain request; returns (status, body bytes, headers) for errors too."""
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json"} | (headers or {})
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(url + path, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def error_of(payload: bytes, status: int) -> dict:
    """The OpenAI error object, checked for its exact shape."""
    body = json.loads(payload)
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    return error


def echoed(prompt_ids: list[int], output_index: int, count: int) -> list[int]:
    return [echo_token(prompt_ids, output_index, step) for step in range(count)]


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                   tokenize=False)  # fmt: skip
    return tok.encode(text, add_special_tokens=False)


def assert_serving(client: openai.OpenAI) -> None:
    """A 4xx or 5xx leaves the server serving: the next good request succeeds."""
    r = client.completions.create(model=NAME, prompt="one two three", max_tokens=2)
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("one two", "length")


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


# --- completions ------------------------------------------------------------------------------


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    (model,) = client.models.list().data
    assert model.id == NAME and model.object == "model"
    assert model.model_extra["max_model_len"] == MAX_LEN


def test_completion_text_usage_and_defaults(client, engine, tok) -> None:
    r = client.completions.create(model=NAME, prompt=FOX, max_tokens=5)
    ids = tok.encode(FOX)
    (choice,) = r.choices
    assert choice.text == tok.decode(ids[:5]) and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 5)
    assert r.usage.total_tokens == len(ids) + 5
    assert r.id.startswith("cmpl-") and r.model == NAME and r.object == "text_completion"
    (call,) = engine.calls
    assert call.prompt_token_ids == ids and call.prompt == FOX
    assert (call.params.temperature, call.params.top_p) == (0.6, 0.9)  # the model's defaults
    client.completions.create(model=NAME, prompt=[1, 2, 3])  # no max_tokens: OpenAI's 16
    assert engine.calls[-1].params.max_tokens == 16
    client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}])
    assert engine.calls[-1].params.max_tokens == MAX_LEN - len(engine.calls[-1].prompt_token_ids)


def test_completion_many_prompts_times_n(client, tok) -> None:
    prompts = ["alpha beta gamma delta", "epsilon zeta"]
    r = client.completions.create(model=NAME, prompt=prompts, n=2, max_tokens=3)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for c in r.choices:
        ids = tok.encode(prompts[c.index // 2])
        assert c.text == tok.decode(echoed(ids, c.index % 2, 3))
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    assert r.usage.completion_tokens == 12


def test_completion_token_id_prompts_with_echo(client, tok) -> None:
    prompts = [[100, 200, 300, 400], [555, 666, 777]]
    r = client.completions.create(model=NAME, prompt=prompts, echo=True, max_tokens=2)
    for c, ids in zip(r.choices, prompts, strict=True):
        assert c.text == tok.decode(ids) + tok.decode(ids[:2])


def test_stop_strings_and_stop_token_ids(client, tok) -> None:
    prompt = "one two three four five six"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=6, stop=[" three", "x"])
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("one two", "stop")
    four = tok.encode(prompt)[3]
    r = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=6, extra_body={"stop_token_ids": [four]}
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == ("one two three", "stop")
    assert r.usage.completion_tokens == 4


def sse_chunks(payload: bytes) -> list[dict]:
    """The JSON chunks of a raw event stream, [DONE] left out."""
    events = payload.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def test_stop_reason_is_the_stop_string_or_token_that_ended_the_choice(url, client, tok) -> None:
    prompt = "one two three four five six"
    four = tok.encode(prompt)[3]
    kwargs = {"model": NAME, "prompt": prompt, "max_tokens": 6}
    r = client.completions.create(**kwargs, stop=[" three", "x"])
    assert (r.choices[0].finish_reason, r.choices[0].model_extra["stop_reason"]) == (
        "stop", " three",
    )  # fmt: skip
    r = client.completions.create(**kwargs, extra_body={"stop_token_ids": [four]})
    assert r.choices[0].model_extra["stop_reason"] == four
    choice = client.completions.create(**kwargs | {"max_tokens": 2}).choices[0]
    assert (choice.finish_reason, choice.model_extra["stop_reason"]) == ("length", None)
    # streamed completions: every chunk's choice has it, null until the one that ends it
    status, payload, _ = http(url, "/v1/completions", kwargs | {"stop": " four", "stream": True})
    choices = [c["choices"][0] for c in sse_chunks(payload)]
    assert status == 200 and [c["stop_reason"] for c in choices] == [None, None, None, " four"]
    # chat, whole and streamed (there only in the chunk with the finish_reason, as vLLM)
    ids = chat_ids(tok, HELLO)
    stop = next(t for k, t in enumerate(ids) if k > 0 and t not in ids[:k])
    body = {"model": NAME, "messages": HELLO, "max_tokens": 20, "stop_token_ids": [stop]}
    _, payload, _ = http(url, "/v1/chat/completions", body)
    (choice,) = json.loads(payload)["choices"]
    assert (choice["finish_reason"], choice["stop_reason"]) == ("stop", stop)
    _, payload, _ = http(url, "/v1/chat/completions", body | {"stream": True})
    choices = [c["choices"][0] for c in sse_chunks(payload)]
    assert len(choices) > 2 and all("stop_reason" not in c for c in choices[:-1])
    assert (choices[-1]["finish_reason"], choices[-1]["stop_reason"]) == ("stop", stop)
    _, payload, _ = http(url, "/v1/chat/completions", body | {"max_tokens": 1, "stream": True})
    assert sse_chunks(payload)[-1]["choices"][0]["stop_reason"] is None  # "length"


def test_completion_logprobs(client, tok) -> None:
    r = client.completions.create(model=NAME, prompt=FOX, max_tokens=3, logprobs=2)
    ids = tok.encode(FOX)[:3]
    texts = [tok.decode([t]) for t in ids]
    lp = r.choices[0].logprobs
    assert lp.tokens == texts and lp.token_logprobs == [-0.25] * 3
    assert lp.top_logprobs == [{tok.decode([t]): -0.25, tok.decode([t + 1]): -2.0} for t in ids]
    assert lp.text_offset == [0, 3, 9]  # "The", " quick", " brown"


def test_completion_echo_lists_the_prompt_tokens_with_their_logprobs(client, tok, engine) -> None:
    r = client.completions.create(model=NAME, prompt=FOX, max_tokens=2, logprobs=2, echo=True)
    assert engine.calls[-1].params.prompt_logprobs == 2
    ids = tok.encode(FOX)
    outputs = ids[:2]  # the fake engine echoes the prompt
    (choice,) = r.choices
    assert choice.text == FOX + tok.decode(outputs)
    lp = choice.logprobs
    assert lp.tokens == [tok.decode([t]) for t in ids + outputs]
    # the first prompt token is scored by nothing: null, as OpenAI and vLLM show it
    assert lp.token_logprobs == [None] + [-0.25] * (len(ids) - 1 + 2)
    assert lp.top_logprobs[0] is None
    assert lp.top_logprobs[1:] == [
        {tok.decode([t]): -0.25, tok.decode([t + 1]): -2.0} for t in ids[1:] + outputs
    ]
    # "The", " quick", ...: one token a word, each starting at its space
    starts = [0] + [i for i, c in enumerate(FOX) if c == " "]
    assert lp.text_offset == starts + [len(FOX), len(FOX) + 3]


def test_completion_echo_with_max_tokens_0_scores_the_prompt_alone(client, tok) -> None:
    # as lm-evaluation-harness asks for a loglikelihood: token ids, echo, 1 logprob
    ids = tok.encode(FOX)
    kwargs = {"model": NAME, "prompt": [ids, ids[:4]], "max_tokens": 0, "echo": True}
    r = client.completions.create(**kwargs, logprobs=1)
    for choice, want in zip(r.choices, [ids, ids[:4]], strict=True):
        assert choice.text == tok.decode(want) and choice.finish_reason == "length"
        assert choice.logprobs.tokens == [tok.decode([t]) for t in want]
        assert choice.logprobs.token_logprobs == [None] + [-0.25] * (len(want) - 1)
    assert r.usage.completion_tokens == 0
    stream = list(client.completions.create(**kwargs, logprobs=1, stream=True))
    for choice in r.choices:
        mine = [c.choices[0] for c in stream if c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert [t for c in mine for t in c.logprobs.token_logprobs] == (
            choice.logprobs.token_logprobs
        )
    plain = client.completions.create(**kwargs)  # no logprobs asked: none scored
    assert plain.choices[0].logprobs is None and plain.choices[0].text == tok.decode(ids)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=NAME, prompt=FOX, max_tokens=0)


def test_completion_echo_logprobs_with_n_repeat_the_prompt_in_every_choice(client, tok) -> None:
    r = client.completions.create(model=NAME, prompt=FOX, n=3, max_tokens=1, logprobs=0, echo=True)
    ids = tok.encode(FOX)
    for choice in r.choices:
        assert choice.logprobs.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
        assert choice.logprobs.token_logprobs[0] is None
        assert len(choice.logprobs.token_logprobs) == len(ids) + 1


def test_completion_offsets_of_characters_split_over_tokens(client, tok) -> None:
    ids = tok.encode(SPLIT)
    assert len(ids) == 13
    kwargs = {"model": NAME, "prompt": SPLIT, "max_tokens": len(ids), "logprobs": 0}
    choice = client.completions.create(**kwargs).choices[0]
    assert choice.text == SPLIT
    # a token that continues a character shares its offset: the text's length before it
    want = [0, 1, 1, 2, 2, 2, 3, 4, 5, 6, 9, 10, 10]
    assert choice.logprobs.text_offset == want
    assert "".join(SPLIT[o] for o in want) == " 世世界界界! üb 🎉🎉"
    assert choice.logprobs.tokens == [tok.decode([t]) for t in ids]  # as vLLM shows them
    stream = list(client.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].text for c in stream) == SPLIT
    assert [o for c in stream for o in c.choices[0].logprobs.text_offset] == want


def test_completion_stream_equals_the_full_response(client) -> None:
    kwargs = {"model": NAME, "prompt": [FOX, "a b c d e f"], "n": 2, "max_tokens": 7}
    full = client.completions.create(**kwargs, logprobs=1)
    stream = client.completions.create(
        **kwargs, logprobs=1, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    *body, last = chunks
    assert last.choices == [] and last.usage == full.usage
    assert all(c.usage is None and len(c.choices) == 1 for c in body)
    for want in full.choices:
        mine = [c.choices[0] for c in body if c.choices[0].index == want.index]
        assert "".join(c.text for c in mine) == want.text
        assert [c.finish_reason for c in mine][-1] == want.finish_reason
        offsets = [o for c in mine for o in c.logprobs.text_offset]
        assert offsets == want.logprobs.text_offset  # offsets run on across chunks
        assert [t for c in mine for t in c.logprobs.tokens] == want.logprobs.tokens


# --- chat -------------------------------------------------------------------------------------


def test_chat_completion(client, engine, tok) -> None:
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=6)
    ids = chat_ids(tok, HELLO)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == tok.decode(ids[:6])
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 6)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    r = client.chat.completions.create(
        model=NAME, messages=HELLO, max_completion_tokens=2,
        extra_body={"add_generation_prompt": False},
    )  # fmt: skip
    assert engine.calls[-1].prompt_token_ids == chat_ids(tok, HELLO, False)
    assert engine.calls[-1].params.max_tokens == 2


def test_chat_stream_n2_with_usage(client, tok) -> None:
    stream = client.chat.completions.create(
        model=NAME, messages=HELLO, n=2, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    *body, last = list(stream)
    ids = chat_ids(tok, HELLO)
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == len(ids)
    for index in (0, 1):
        mine = [c.choices[0] for c in body if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant"  # the first chunk of each choice has the role
        assert all(c.delta.role is None for c in mine[1:])
        assert "".join(c.delta.content or "" for c in mine) == tok.decode(echoed(ids, index, 5))
        assert mine[-1].finish_reason == "length"
        assert all(c.finish_reason is None for c in mine[:-1])


def test_chat_logprobs(client, tok) -> None:
    r = client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=4, logprobs=True, top_logprobs=3
    )
    ids = chat_ids(tok, HELLO)[:4]
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [tok.decode([t]) for t in ids]
    for e, t in zip(content, ids, strict=True):
        assert e.logprob == -0.25 and bytes(e.bytes) == e.token.encode()  # all ASCII
        assert [a.token for a in e.top_logprobs] == [tok.decode([t + k]) for k in range(3)]
        assert [a.logprob for a in e.top_logprobs] == [-0.25, -2.0, -3.0]
    r = client.chat.completions.create(model=NAME, messages=HELLO, max_tokens=2)
    assert r.choices[0].logprobs is None


def test_chat_logprob_bytes_rebuild_characters_split_over_tokens(client, tok) -> None:
    messages = [{"role": "user", "content": SPLIT}]
    ids = chat_ids(tok, messages)
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=len(ids), logprobs=True, top_logprobs=2
    )
    (choice,) = r.choices
    assert SPLIT in choice.message.content
    content = choice.logprobs.content
    # the raw bytes of the tokens join to the text, split characters too
    assert b"".join(bytes(e.bytes) for e in content).decode() == choice.message.content
    assert any(bytes(e.bytes) != e.token.encode() for e in content)
    for e in content:
        # a token decoded alone shows its bytes, with U+FFFD for part of a character
        for c in (e, *e.top_logprobs):
            assert bytes(c.bytes).decode("utf-8", "replace") == c.token


def test_every_sampling_parameter_reaches_the_engine(client, engine) -> None:
    client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=9, temperature=1.3, top_p=0.7, seed=11,
        presence_penalty=0.4, frequency_penalty=-0.2, stop="END", logit_bias={"42": -50},
        user="someone",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True,
                    "min_tokens": 3, "stop_token_ids": [7], "bad_words": ["spam", " eggs"]},
    )  # fmt: skip
    p = engine.calls[-1].params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.top_k, p.min_p) == (
        9, 1.3, 0.7, 11, 5, 0.05,
    )  # fmt: skip
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.4, -0.2, 1.2)
    assert (p.stop, p.stop_token_ids, p.logit_bias) == (("END",), (7,), {42: -50.0})
    assert (p.ignore_eos, p.min_tokens, p.logprobs) == (True, 3, None)
    assert p.bad_words == ("spam", " eggs")


# --- token ids (vLLM's return_token_ids, return_tokens_as_token_ids) --------------------------


def test_completion_returns_token_ids_whole_and_streamed(client, tok) -> None:
    prompts = [SPLIT, "a b c d e f"]
    kwargs = {"model": NAME, "prompt": prompts, "n": 2, "max_tokens": 13}
    full = client.completions.create(**kwargs, extra_body={"return_token_ids": True})
    for c in full.choices:
        ids = tok.encode(prompts[c.index // 2])
        assert c.prompt_token_ids == ids
        assert c.token_ids == echoed(ids, c.index % 2, 13)
    stream = client.completions.create(**kwargs, stream=True, extra_body={"return_token_ids": True})
    chunks = [c.choices[0] for c in stream]
    for want in full.choices:
        mine = [c for c in chunks if c.index == want.index]
        # a chunk per token, text held back (a character's first bytes) or not
        assert [len(c.token_ids) for c in mine] == [1] * 13
        assert [t for c in mine for t in c.token_ids] == want.token_ids
        assert mine[0].prompt_token_ids == want.prompt_token_ids
        assert all(c.model_extra.get("prompt_token_ids") is None for c in mine[1:])
        assert "".join(c.text for c in mine) == want.text
    assert any(c.text == "" for c in chunks)  # SPLIT's characters span tokens
    plain = client.completions.create(**kwargs).choices[0]
    assert "token_ids" not in plain.model_extra and "prompt_token_ids" not in plain.model_extra


def test_chat_returns_token_ids_with_the_prompt_at_the_top(client, tok) -> None:
    ids = chat_ids(tok, HELLO)
    extra = {"return_token_ids": True}
    r = client.chat.completions.create(
        model=NAME, messages=HELLO, n=2, max_tokens=5, extra_body=extra
    )
    assert r.prompt_token_ids == ids
    assert [c.token_ids for c in r.choices] == [echoed(ids, k, 5) for k in (0, 1)]
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=HELLO, n=2, max_tokens=5, stream=True, extra_body=extra
        )
    )
    for k in (0, 1):
        mine = [c for c in chunks if c.choices[0].index == k]
        assert mine[0].prompt_token_ids == ids  # each choice's role chunk has them, as vLLM
        assert all(c.model_extra.get("prompt_token_ids") is None for c in mine[1:])
        got = [t for c in mine for t in (c.choices[0].model_extra.get("token_ids") or [])]
        assert got == r.choices[k].token_ids


def test_logprob_tokens_as_token_ids(client, tok) -> None:
    extra = {"return_tokens_as_token_ids": True}
    ids = tok.encode(FOX)
    r = client.completions.create(
        model=NAME, prompt=FOX, max_tokens=3, logprobs=2, echo=True, extra_body=extra
    )
    lp = r.choices[0].logprobs
    want = [*ids, *ids[:3]]
    assert lp.tokens == [f"token_id:{t}" for t in want]  # the echoed prompt's tokens too
    assert list(lp.top_logprobs[-1]) == [f"token_id:{ids[2]}", f"token_id:{ids[2] + 1}"]
    assert r.choices[0].text == FOX + tok.decode(ids[:3])
    r = client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=1, extra_body=extra
    )
    chat = chat_ids(tok, HELLO)
    assert [e.token for e in r.choices[0].logprobs.content] == [f"token_id:{t}" for t in chat[:2]]


def test_priority_reaches_the_engine(tok) -> None:
    engine = FakeEngine(tok)
    engine.scheduling_policy = "priority"
    with live_server(engine, ServerConfig()) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        extra = {"priority": -2}
        client.completions.create(prompt=["a b", "c d"], max_tokens=2, model=engine.model_name,
                                  extra_body=extra)  # fmt: skip
        client.chat.completions.create(
            messages=HELLO, max_tokens=2, model=engine.model_name, extra_body=extra
        )
    assert [c.priority for c in engine.calls] == [-2, -2, -2]  # both prompts, then the chat


def test_prompt_logprobs_in_completions_and_chat(client, tok) -> None:
    prompts = [FOX, "a b c"]
    r = client.completions.create(
        model=NAME, prompt=prompts, n=2, max_tokens=2, extra_body={"prompt_logprobs": 1}
    )
    for c in r.choices:
        ids = tok.encode(prompts[c.index // 2])
        shown = c.model_extra["prompt_logprobs"]
        assert shown[0] is None and len(shown) == len(ids)
        for t, entry in zip(ids[1:], shown[1:], strict=True):
            # the fake engine ranks each token first (-0.25), then the next id
            assert entry == {
                str(t): {"logprob": -0.25, "rank": 1, "decoded_token": tok.decode([t])}
            }
    assert r.choices[0].logprobs is None  # the completion's own tokens were not asked for
    chat = client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=2, extra_body={"prompt_logprobs": 2}
    )
    ids = chat_ids(tok, HELLO)
    shown = chat.model_extra["prompt_logprobs"]
    assert len(shown) == len(ids) and sorted(shown[1], key=int) == [str(ids[1]), str(ids[1] + 1)]
    assert "prompt_logprobs" not in chat.choices[0].model_extra


def test_continuous_usage_stats_in_every_chunk(client, tok) -> None:
    stream = client.completions.create(
        model=NAME, prompt=FOX, n=2, max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True},
    )  # fmt: skip
    *body, last = list(stream)
    prompt = len(tok.encode(FOX))
    assert [c.usage.completion_tokens for c in body] == [1, 2, 3, 4, 5, 6]  # so far
    assert all(c.usage.prompt_tokens == prompt for c in body)
    assert last.choices == [] and last.usage.completion_tokens == 6


# --- tokenize, health, metrics ----------------------------------------------------------------


def test_tokenize_and_detokenize(url, tok) -> None:
    status, body, _ = http(url, "/tokenize", {"prompt": FOX}, key=None)
    assert status == 200
    assert json.loads(body) == {
        "tokens": tok.encode(FOX), "count": len(tok.encode(FOX)), "max_model_len": MAX_LEN,
    }  # fmt: skip
    status, body, _ = http(url, "/tokenize", {"model": NAME, "messages": HELLO}, key=None)
    assert json.loads(body)["tokens"] == chat_ids(tok, HELLO)
    status, body, _ = http(url, "/detokenize", {"tokens": tok.encode(FOX)}, key=None)
    assert (status, json.loads(body)) == (200, {"prompt": FOX})


def test_tokenize_returns_token_strings_when_asked(url, tok) -> None:
    body = {"prompt": FOX, "return_token_strs": True}
    status, payload, _ = http(url, "/tokenize", body, key=None)
    ids = tok.encode(FOX)
    got = json.loads(payload)
    assert status == 200 and got["tokens"] == ids
    assert got["token_strs"] == tok.convert_ids_to_tokens(ids)
    assert got["token_strs"][:2] == ["The", "Ġquick"]  # the tokenizer's strings, not decoded
    _, payload, _ = http(url, "/tokenize", {"messages": HELLO, "return_token_strs": True})
    assert json.loads(payload)["token_strs"] == tok.convert_ids_to_tokens(chat_ids(tok, HELLO))


def test_version_ping_and_one_models_card(url, client) -> None:
    status, payload, _ = http(url, "/version", method="GET", key=None)
    version = importlib.metadata.version("kiln-llm")
    assert (status, json.loads(payload)) == (200, {"version": version})
    for method in ("GET", "POST"):
        assert http(url, "/ping", method=method, key=None)[0] == 200
    model = client.models.retrieve(NAME)
    assert model.to_dict() == client.models.list().data[0].to_dict()
    assert http(url, f"/v1/models/{NAME}", method="GET", key=None)[0] == 401  # under /v1
    status, payload, _ = http(url, "/v1/models/gpt-x", method="GET")
    error = error_of(payload, 404)
    assert (status, error["message"]) == (404, "The model `gpt-x` does not exist.")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-x")


def test_a_dead_engine_fails_ping_as_it_fails_health(url, engine) -> None:
    engine.dead = True
    for method in ("GET", "POST"):
        assert http(url, "/ping", method=method, key=None)[0] == 503


def test_cached_prompt_tokens_with_enable_prompt_tokens_details(tok) -> None:
    """vLLM's --enable-prompt-tokens-details: the prefix cache's share of the prompt tokens,
    whole and in the streamed usage; each prompt's counted once, however many choices it has.
    Without it, as by default in vLLM, the usage has no details."""
    engine = FakeEngine(tok)
    engine.cached_tokens = 4
    name = "org/smol"  # a name with a slash: its card is still found
    config = ServerConfig(served_model_name=name, enable_prompt_tokens_details=True)
    with live_server(engine, config) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model=name, prompt=[FOX, "a b c d e"], n=2, max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens == 8
        stream = client.chat.completions.create(
            model=name, messages=HELLO, max_tokens=2, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        assert list(stream)[-1].usage.prompt_tokens_details.cached_tokens == 4
        engine.cached_tokens = 0
        r = client.chat.completions.create(model=name, messages=HELLO, max_tokens=2)
        assert r.usage.prompt_tokens_details.cached_tokens == 0  # reported, 0 or not
        status, payload, _ = http(base, f"/v1/models/{name}", method="GET", key=None)
        assert (status, json.loads(payload)["id"]) == (200, name)
    with live_server(engine, ServerConfig(served_model_name=name)) as base:
        engine.cached_tokens = 4
        _, payload, _ = http(base, "/v1/completions", {"prompt": FOX, "max_tokens": 2})
        assert "prompt_tokens_details" not in json.loads(payload)["usage"]


def test_unknown_fields_are_served_and_logged_once_a_request(client, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="server.fields"):
        r = client.completions.create(
            model=NAME, prompt="one two three", max_tokens=2, user="someone",
            extra_body={"frobnicate": 1, "length_penalty": 0.5},
        )  # fmt: skip
    assert r.choices[0].text == "one two"
    [record] = [r for r in caplog.records if r.name == "server.fields"]
    assert record.levelno == logging.WARNING and record.getMessage() == (
        "The following fields were present in the request but ignored: "
        "{'frobnicate', 'length_penalty'}"
    )


def test_best_of_and_beam_search_are_400s(url, client) -> None:
    for body, param in [
        (GOOD | {"best_of": 2}, "best_of"),
        (GOOD | {"use_beam_search": True}, "use_beam_search"),
        ({"messages": HELLO, "use_beam_search": True}, "use_beam_search"),
    ]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        status, payload, _ = http(url, path, body)
        assert (status, error_of(payload, 400)["param"]) == (400, param)
    assert http(url, "/v1/completions", GOOD | {"best_of": 1, "use_beam_search": False})[0] == 200
    assert_serving(client)


def metric_samples(url: str) -> dict[str, float]:
    status, body, headers = http(url, "/metrics", method="GET", key=None)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if "le" not in s.labels and s.labels.get("model_name") == NAME:
                reason = s.labels.get("finished_reason")
                out[s.name + (f"{{{reason}}}" if reason else "")] = s.value
    return out


def test_health_and_metrics(url, client, engine, tok) -> None:
    assert http(url, "/health", method="GET", key=None)[0] == 200
    before = metric_samples(url)
    client.completions.create(model=NAME, prompt=FOX, max_tokens=5)
    after = metric_samples(url)

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert grew("kiln:prompt_tokens_total") == len(tok.encode(FOX))
    assert grew("kiln:generation_tokens_total") == 5
    assert grew("kiln:time_to_first_token_seconds_count") == 1
    assert grew("kiln:inter_token_latency_seconds_count") == 4
    assert grew("kiln:e2e_request_latency_seconds_count") == 1
    assert grew("kiln:request_success_total{length}") == 1
    assert (
        grew("kiln:request_success_total{stop}") == grew("kiln:request_success_total{abort}") == 0
    )
    assert after["kiln:num_requests_running"] == 0 and after["kiln:num_requests_waiting"] == 2
    engine.fail = ValueError("prompt + max_tokens is more than the whole KV cache holds")
    with pytest.raises(openai.BadRequestError):  # refused: its prompt is never run
        client.completions.create(model=NAME, prompt=FOX, max_tokens=5)
    assert metric_samples(url)["kiln:prompt_tokens_total"] == after["kiln:prompt_tokens_total"]
    assert after["kiln:kv_cache_usage_perc"] == 0.25
    assert after["kiln:prefix_cache_hits_total"] == 40
    assert after["kiln:prefix_cache_queries_total"] == 100


def test_latency_metrics_leave_out_a_slow_clients_delay(tok) -> None:
    """The engine's updates are timed as they reach the server, not as the handler pulls them:
    a streaming client that reads nothing for `delay` s holds its handler at a full socket (its
    writes wait to drain) while the engine runs on; no latency observed includes that wait.
    (TTFT alone could not include it before either: the handler pulls the first update before
    it writes anything; end to end and inter-token latency did.)"""
    delay, n, max_tokens = 2.0, 16, 75  # 1200 chunks of ~0.4 kB: far more than the buffers
    engine = FakeEngine(tok)
    engine.runs_ahead = True  # as the real engine: its updates come however late they are pulled
    app = create_app(engine, ServerConfig(served_model_name=NAME))
    small = 4096  # the kernel's buffers either side: a few kB, not autotuned to megabytes

    async def small_send_buffer(request: web.Request, response: web.StreamResponse) -> None:
        request.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, small
        )

    app.on_response_prepare.append(small_send_buffer)
    body = json.dumps({"model": NAME, "prompt": FOX, "max_tokens": max_tokens, "n": n,
                       "logprobs": 5, "stream": True}).encode()  # fmt: skip

    def sample(name: str) -> float:
        return app[STATE].metrics.registry.get_sample_value(name, {"model_name": NAME}) or 0.0

    async def main() -> tuple[bytes, tuple[int, float]]:
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, ("127.0.0.1", runner.addresses[0][1]))
                head = (
                    "POST /v1/completions HTTP/1.1\r\nHost: kiln\r\nConnection: close\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                )
                await loop.sock_sendall(sock, head.encode() + body)
                await asyncio.sleep(delay)  # a client that reads nothing for a while
                during = engine.running, sample("kiln:e2e_request_latency_seconds_count")
                got = []
                while data := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10):
                    got.append(data)
                return b"".join(got), during
            finally:
                await runner.cleanup()

    response, during = asyncio.run(main())
    # meanwhile the engine had made every update, all timed; the handler still had some to write
    assert during == (1, 1)
    assert response.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in response
    assert len(response) > 200_000 and engine.running == 0 and not engine.closed
    assert sample("kiln:generation_tokens_total") == n * max_tokens
    assert sample("kiln:time_to_first_token_seconds_count") == 1
    assert sample("kiln:inter_token_latency_seconds_count") == n * max_tokens - 1
    assert sample("kiln:e2e_request_latency_seconds_count") == 1
    # generous: the engine makes all its updates in well under delay / 2 (0.1-0.5 s, on two
    # busy cores); timed as the handler pulled them, end to end and the gaps summed to more
    # than delay
    for name in ("time_to_first_token", "inter_token_latency", "e2e_request_latency"):
        assert sample(f"kiln:{name}_seconds_sum") < delay / 2, name


# --- errors -----------------------------------------------------------------------------------

GOOD = {"model": NAME, "prompt": "hi there", "max_tokens": 2}
ERRORS = [
    # (name, path, body, method, key, headers, status, param)
    ("not json", "/v1/completions", b"{oops", "POST", KEY, None, 400, None),
    ("not an object", "/v1/completions", b"[1]", "POST", KEY, None, 400, None),
    ("content type", "/v1/completions", GOOD, "POST", KEY, {"Content-Type": "text/plain"},
     400, None),
    ("no prompt", "/v1/completions", {"model": NAME}, "POST", KEY, None, 400, "prompt"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "x", "content": "a"}]},
     "POST", KEY, None, 400, "messages"),
    ("temperature", "/v1/completions", GOOD | {"temperature": 3}, "POST", KEY, None, 400,
     "temperature"),
    ("top_p", "/v1/chat/completions", {"messages": HELLO, "top_p": 0}, "POST", KEY, None, 400,
     "top_p"),
    ("n", "/v1/completions", GOOD | {"n": 5}, "POST", KEY, None, 400, "n"),
    ("logprobs", "/v1/completions", GOOD | {"logprobs": 21}, "POST", KEY, None, 400,
     "logprobs"),
    ("context", "/v1/completions", GOOD | {"max_tokens": 1000}, "POST", KEY, None, 400,
     "max_tokens"),
    ("vocab", "/v1/completions", GOOD | {"prompt": [1, 10**6]}, "POST", KEY, None, 400,
     "prompt"),
    ("stop ids", "/v1/completions", GOOD | {"stop_token_ids": [-3]}, "POST", KEY, None, 400,
     "stop_token_ids"),
    ("stop ids type", "/v1/completions", GOOD | {"stop_token_ids": 0}, "POST", KEY, None, 400,
     "stop_token_ids"),
    ("seed", "/v1/completions", GOOD | {"seed": 2**64}, "POST", KEY, None, 400, "seed"),
    ("stream options", "/v1/completions", GOOD | {"stream_options": {"include_usage": True}},
     "POST", KEY, None, 400, "stream_options"),
    ("suffix", "/v1/completions", GOOD | {"suffix": "x"}, "POST", KEY, None, 400, "suffix"),
    ("wrong key", "/v1/completions", GOOD, "POST", "sk-wrong", None, 401, None),
    ("no key", "/v1/models", None, "GET", None, None, 401, None),
    ("not bearer", "/v1/models", None, "GET", None, {"Authorization": KEY}, 401, None),
    ("model", "/v1/completions", GOOD | {"model": "gpt-4"}, "POST", KEY, None, 404, "model"),
    ("route", "/v1/nowhere", GOOD, "POST", KEY, None, 404, None),
    ("route, unguarded", "/nowhere", None, "GET", None, None, 404, None),
    ("method", "/v1/completions", None, "GET", KEY, None, 405, None),
    ("too large", "/v1/completions", GOOD | {"prompt": "x" * (100 << 10)}, "POST", KEY, None,
     413, None),
]  # fmt: skip


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_error_statuses_then_a_good_request(url, client, case) -> None:
    _, path, body, method, key, headers, status, param = case
    got, payload, response_headers = http(url, path, body, method, key, headers)
    error = error_of(payload, status)
    assert (got, error["param"]) == (status, param), error
    if case[0] == "context":
        assert "1000" in error["message"] and str(MAX_LEN) in error["message"]
    if status == 405:
        assert "POST" in response_headers["Allow"]
    assert_serving(client)


def test_openai_client_sees_typed_errors(client) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=NAME, prompt="a", temperature=2.5)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    bad_key = client.with_options(api_key="sk-nope")
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    assert_serving(client)


@pytest.mark.parametrize(
    "failure, status",
    [
        (ValueError("needs 900 KV blocks; the cache has 64"), 400),
        (EngineDeadError("engine loop died"), 503),
        (RuntimeError("kaboom in /secret/path/engine.py"), 500),
    ],
)
def test_engine_failures(url, client, engine, caplog, failure, status) -> None:
    engine.fail = failure
    with caplog.at_level(logging.ERROR, logger="server.app"):
        got, payload, _ = http(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2})
    error = error_of(payload, status)
    assert got == status
    if status == 400:
        assert error["message"] == str(failure)
    if status == 500:
        assert "/secret" not in error["message"] and "Traceback" not in error["message"]
        assert any(r.exc_info and r.exc_info[1] is failure for r in caplog.records)
    assert_serving(client)


def test_error_mid_stream_is_an_error_chunk_then_done(url, client, engine) -> None:
    engine.fail_after = 2
    body = {"messages": HELLO, "max_tokens": 8, "stream": True}
    status, payload, headers = http(url, "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = payload.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["code"] == 500 and "/secret" not in error["message"]
    engine.fail_after = 2
    with pytest.raises(openai.APIError, match="internal server error"):
        list(client.chat.completions.create(model=NAME, messages=HELLO, stream=True))
    assert_serving(client)


def test_a_slow_first_token_does_not_hold_back_a_streams_headers(url, engine, monkeypatch):
    """The headers wait HEADERS_WAIT_S at most for the engine's first word: a refusal within
    it keeps its own status, a slow first token (queued, a grammar compiling) gets the headers
    first, as vLLM sends them at once."""
    import server.app

    monkeypatch.setattr(server.app, "HEADERS_WAIT_S", 0.05)
    engine.token_delay = 0.5
    body = json.dumps({"messages": HELLO, "max_tokens": 2, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    request = urllib.request.Request(f"{url}/v1/chat/completions", body, headers)
    start = time.monotonic()
    with urllib.request.urlopen(request, timeout=10) as r:
        answered = time.monotonic() - start
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = r.read().decode().split("\n\n")
    assert answered < 0.4 < time.monotonic() - start  # headers long before the tokens
    assert events[-2:] == ["data: [DONE]", ""] and len(engine.calls) == 1
    engine.fail = ValueError("prompt too long for this test")  # a refusal within the wait
    status, payload, _ = http(url, "/v1/chat/completions", json.loads(body))
    assert status == 400 and "too long" in error_of(payload, 400)["message"]


def test_engine_death_mid_stream_is_a_503_chunk_then_done(url, client, engine) -> None:
    engine.die_after = 2
    body = {"prompt": FOX, "max_tokens": 8, "stream": True}
    status, payload, _ = http(url, "/v1/completions", body)
    events = payload.decode().split("\n\n")
    assert status == 200 and events[-2:] == ["data: [DONE]", ""]
    assert len(events) == 5  # two token chunks, the error chunk, [DONE] and ""
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert (error["code"], error["type"]) == (503, "service_unavailable_error")
    assert http(url, "/health", method="GET", key=None)[0] == 503
    assert http(url, "/v1/completions", GOOD)[0] == 503
    engine.dead = False
    assert_serving(client)


def test_dead_engine_is_503_until_it_lives(url, client, engine) -> None:
    engine.dead = True
    status, payload, _ = http(url, "/health", method="GET", key=None)
    assert status == 503 and error_of(payload, 503)["type"] == "service_unavailable_error"
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model=NAME, prompt="a", max_tokens=1)
    assert caught.value.status_code == 503
    engine.dead = False
    assert http(url, "/health", method="GET", key=None)[0] == 200


# --- disconnects ------------------------------------------------------------------------------


def test_streaming_client_that_leaves_aborts_its_request(url, client, engine) -> None:
    engine.token_delay = 0.02
    aborted = metric_samples(url).get("kiln:request_success_total{abort}", 0.0)
    stream = client.chat.completions.create(
        model=NAME, messages=HELLO, max_tokens=200, stream=True, n=2
    )
    chunks = [next(stream) for _ in range(3)]
    assert chunks[0].choices[0].delta.role == "assistant"
    stream.close()
    wait_for(lambda: engine.closed)
    assert engine.closed == [engine.calls[-1].request_id] and engine.running == 0
    # both sequences counted as aborted
    wait_for(lambda: metric_samples(url)["kiln:request_success_total{abort}"] == aborted + 2)
    engine.token_delay = 0.0
    assert_serving(client)


def test_client_timeout_aborts_a_non_streamed_request(client, engine) -> None:
    engine.token_delay = 0.02
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).completions.create(model=NAME, prompt=FOX, max_tokens=200)
    wait_for(lambda: engine.closed)
    assert engine.closed == [engine.calls[-1].request_id] and engine.running == 0


def test_hundreds_of_abandoned_requests_then_a_prompt_answer(url, client, engine) -> None:
    engine.token_delay = 0.01
    headers = {"Authorization": f"Bearer {KEY}"}

    async def abandon(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": FOX, "max_tokens": 200, "stream": i % 2 == 0}
        with contextlib.suppress(asyncio.TimeoutError):
            async with session.post(f"{url}/v1/completions", json=body, headers=headers) as r:
                await r.read()

    async def main() -> None:
        # 1 s: on a busy CI core 200 requests need a while to reach the engine; each would
        # take 2 s (200 tokens, 10 ms each), so every one is still abandoned mid-generation
        timeout = aiohttp.ClientTimeout(total=1.0)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(abandon(session, i) for i in range(200)))

    asyncio.run(main())
    # a request that timed out before reaching the engine never calls it; every other is closed
    for _ in range(2):  # twice: late handlers may still have been starting the first time
        wait_for(lambda: engine.running == 0 and len(engine.closed) == len(engine.calls), 10)
        time.sleep(0.2)
    assert sorted(engine.closed) == sorted(c.request_id for c in engine.calls)
    assert len(engine.calls) >= 10
    engine.token_delay = 0.0
    start = time.monotonic()
    assert_serving(client)
    assert time.monotonic() - start < 2.0


# --- tool calls ----------------------------------------------------------------------------


HERMES = 'Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
LLAMA = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}'


@pytest.mark.parametrize(
    "parser, said, content", [("hermes", HERMES, "Checking.\n"), ("llama3_json", LLAMA, None)]
)
def test_auto_tool_calls_with_a_parser(tok, parser, said, content) -> None:
    engine = FakeEngine(tok)
    engine.reply = tok.encode(said)
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    with live_server(engine, ServerConfig(tool_call_parser=parser)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        kw = dict(model="smollm2-fake", messages=HELLO, tools=tools, max_tokens=64)
        out = client.chat.completions.create(**kw).choices[0]  # tool_choice: auto, the default
        assert out.message.content == content and out.finish_reason == "tool_calls"
        (call,) = out.message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_time", '{"zone": "CET"}')
        assert engine.calls[-1].params.structured_outputs is None  # the model chooses
        chunks = list(client.chat.completions.create(stream=True, **kw))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        calls = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
        assert streamed == (content or "") and len(calls) == 1 and calls[0].id
        assert (calls[0].function.name, calls[0].function.arguments) == (
            "get_time",
            '{"zone": "CET"}',
        )
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        engine.reply = tok.encode("No tool needed.")
        out = client.chat.completions.create(**kw).choices[0]
        assert out.message.content == "No tool needed." and not out.message.tool_calls
        assert out.finish_reason == "stop"


# --- CORS (vLLM's --allowed-origins, --allowed-methods, --allowed-headers) ---------------------


PAGE = "http://page.example"


def preflight(url: str, path: str, origin: str = PAGE, method: str = "POST",
              headers: str = "authorization, content-type") -> tuple[int, dict]:  # fmt: skip
    """A browser's CORS preflight, without the API key, as browsers send it: its status and
    headers (names in lower case)."""
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    status, _, got = http(url, path, method="OPTIONS", key=None, headers=asked)
    return status, {k.lower(): v for k, v in got.items()}


def allowed_origin(headers: dict) -> str | None:
    return {k.lower(): v for k, v in headers.items()}.get("access-control-allow-origin")


def test_cors_by_default_answers_preflights_and_marks_every_response(url) -> None:
    """vLLM's defaults (any origin, method and header): a browser page can call the API with
    its key, and read the errors and the streams too."""
    status, got = preflight(url, "/v1/chat/completions")
    assert status == 200 and got["access-control-allow-origin"] == PAGE
    assert "POST" in got["access-control-allow-methods"]
    allowed = got["access-control-allow-headers"].lower().split(",")
    assert {"authorization", "content-type"} <= {h.strip() for h in allowed}
    # a model name holding "/" ({model:.+}), and the routes outside /v1
    for path in ("/v1/models/org/model", "/health", "/tokenize"):
        assert preflight(url, path, method="GET")[0] == 200, path
    origin = {"Origin": PAGE}
    body = {"model": NAME, "messages": HELLO, "max_tokens": 2}
    status, _, headers = http(url, "/v1/chat/completions", body, headers=origin)
    assert status == 200 and allowed_origin(headers) == PAGE
    status, payload, headers = http(url, "/v1/chat/completions", body | {"stream": True},
                                    headers=origin)  # fmt: skip
    assert status == 200 and allowed_origin(headers) == PAGE
    assert payload.endswith(b"data: [DONE]\n\n")
    status, _, headers = http(url, "/v1/chat/completions", body, key=None, headers=origin)
    assert status == 401 and allowed_origin(headers) == PAGE  # the page reads the 401
    status, _, headers = http(url, "/v1/models/org/model", method="GET", headers=origin)
    assert status == 404 and allowed_origin(headers) == PAGE
    assert allowed_origin(http(url, "/v1/models", method="GET")[2]) is None  # no Origin: no CORS


def test_cors_allows_only_the_origins_methods_and_headers_given(tok) -> None:
    config = ServerConfig(
        api_key=KEY, allowed_origins=(PAGE,), allowed_methods=("POST",),
        allowed_headers=("Authorization",), allow_credentials=True,
    )  # fmt: skip
    with live_server(FakeEngine(tok), config) as base:
        # Content-Type is always allowed (CORS-safelisted), as in vLLM's (Starlette's) CORS
        status, got = preflight(base, "/v1/completions")
        assert status == 200 and got["access-control-allow-origin"] == PAGE
        assert got["access-control-allow-credentials"] == "true"
        for refused in (
            preflight(base, "/v1/completions", origin="http://other.example"),
            preflight(base, "/v1/completions", method="DELETE"),
            preflight(base, "/v1/models", method="GET"),
            preflight(base, "/v1/completions", headers="authorization, x-other"),
        ):
            assert refused[0] == 403 and "access-control-allow-origin" not in refused[1]
        status, payload, _ = http(base, "/v1/completions", method="OPTIONS", key=None,
                                  headers={"Origin": "http://other.example",
                                           "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert error_of(payload, 403)["message"].startswith("CORS preflight request failed")
        body = {"prompt": FOX, "max_tokens": 2}
        status, _, headers = http(base, "/v1/completions", body, headers={"Origin": PAGE})
        assert status == 200 and allowed_origin(headers) == PAGE
        assert {k.lower(): v for k, v in headers.items()}["access-control-allow-credentials"]
        other = {"Origin": "http://other.example"}  # served: keeping its page out is the browser's
        status, _, headers = http(base, "/v1/completions", body, headers=other)
        assert status == 200 and allowed_origin(headers) is None


def test_no_allowed_origins_is_no_cors(tok) -> None:
    with live_server(FakeEngine(tok), ServerConfig(allowed_origins=())) as base:
        assert preflight(base, "/v1/completions")[0] == 405
        status, _, headers = http(base, "/v1/models", method="GET", headers={"Origin": PAGE})
        assert status == 200 and allowed_origin(headers) is None


def test_a_draining_server_answers_preflights_and_its_503s_reach_the_page(tok) -> None:
    """A refused preflight would show the page a network error instead of the 503."""

    async def main() -> tuple[int, int, str | None]:
        app = create_app(FakeEngine(tok), ServerConfig(api_key=KEY))
        app[STATE].draining = True
        async with TestClient(TestServer(app)) as session:
            asked = {"Origin": PAGE, "Access-Control-Request-Method": "POST"}
            async with session.options("/v1/completions", headers=asked) as r:
                answered = r.status
            auth = {"Origin": PAGE, "Authorization": f"Bearer {KEY}"}
            async with session.post("/v1/completions", json={"prompt": FOX}, headers=auth) as r:
                return answered, r.status, r.headers.get("Access-Control-Allow-Origin")

    assert asyncio.run(main()) == (200, 503, PAGE)


# --- kiln run --chat-template -----------------------------------------------------------------


TEMPLATE = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant{% if loud %}!{% endif %}]{% endif %}"
)


def test_chat_template_replaces_the_tokenizers(tok) -> None:
    engine = FakeEngine(tok)
    own = tok.chat_template
    with live_server(engine, ServerConfig(chat_template=TEMPLATE)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        client.chat.completions.create(model="smollm2-fake", messages=HELLO, max_tokens=2)
        prompt = "[user] Say hello.\n[assistant]"
        assert engine.calls[-1].prompt_token_ids == tok.encode(prompt, add_special_tokens=False)
        # chat_template_kwargs are the variables of this template, which the tokenizer's lacks
        kwargs = {"chat_template_kwargs": {"loud": True}}
        client.chat.completions.create(model="smollm2-fake", messages=HELLO, max_tokens=2,
                                       extra_body=kwargs)  # fmt: skip
        loud = tok.encode("[user] Say hello.\n[assistant!]", add_special_tokens=False)
        assert engine.calls[-1].prompt_token_ids == loud
        _, body, _ = http(base, "/tokenize", {"messages": HELLO}, key=None)
        assert json.loads(body)["tokens"] == tok.encode(prompt, add_special_tokens=False)
        # the rest is the tokenizer's: text prompts, detokenizing
        _, body, _ = http(base, "/tokenize", {"prompt": FOX}, key=None)
        assert json.loads(body)["tokens"] == tok.encode(FOX)
        r = client.completions.create(model="smollm2-fake", prompt=FOX, max_tokens=2)
        assert r.choices[0].text == " ".join(FOX.split()[:2])
    assert tok.chat_template == own  # the engine's tokenizer is left as it was


@pytest.mark.parametrize("template", ["{% if %}", "{{ raise_exception('no system turns') }}"])
def test_a_chat_template_that_fails_is_a_400(tok, template) -> None:
    config = ServerConfig(served_model_name=NAME, chat_template=template)
    with live_server(FakeEngine(tok), config) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="cannot apply the chat template"):
            client.chat.completions.create(model=NAME, messages=HELLO)
        assert_serving(client)


def test_a_chat_template_needs_a_tokenizer() -> None:
    engine = FakeEngine(None, max_model_len=64, vocab_size=1000)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        create_app(engine, ServerConfig(chat_template=TEMPLATE))


# --- a token-id-only model, and shutdown ------------------------------------------------------


def test_model_without_tokenizer() -> None:
    engine = FakeEngine(None, max_model_len=64, vocab_size=1000)
    with live_server(engine, ServerConfig()) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="smollm2-fake", prompt="text", max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="smollm2-fake", messages=HELLO)
        r = client.completions.create(model="smollm2-fake", prompt=[5, 6], max_tokens=3,
                                      logprobs=0)  # fmt: skip
        assert r.choices[0].logprobs.tokens == ["token_id:5", "token_id:6", "token_id:5"]
        assert (r.choices[0].text, r.usage.completion_tokens) == ("", 3)
        # streamed, its tokens come as ids, a chunk each, though it has no text to show
        stream = client.completions.create(
            model="smollm2-fake", prompt=[5, 6], max_tokens=3, stream=True,
            extra_body={"return_token_ids": True},
        )  # fmt: skip
        assert [c.choices[0].token_ids for c in stream] == [[5], [6], [5]]


def test_sigterm_drains_then_serve_returns(tok) -> None:
    engine = FakeEngine(tok)
    engine.token_delay = 0.02
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    async def main() -> list[str]:
        app = create_app(engine, ServerConfig())
        served = asyncio.create_task(serve(app, "127.0.0.1", port, 1.0, engine))
        async with aiohttp.ClientSession() as session:
            while True:
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"{base}/health") as r:
                        assert r.status == 200
                        break
                await asyncio.sleep(0.02)
            body = {"prompt": FOX, "max_tokens": 200, "stream": True}
            # a non-streamed request left waiting: only handler cancellation can notice
            left = session.post(f"{base}/v1/completions", json=body | {"stream": False})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(left, 0.1)
            for _ in range(300):  # up to 3 s
                if engine.closed:
                    break
                await asyncio.sleep(0.01)
            assert engine.closed, "the abandoned request was not aborted"
            async with session.post(f"{base}/v1/completions", json=body) as stream:
                await stream.content.readline()
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.sleep(0.05)
                async with session.get(f"{base}/health") as r:
                    assert r.status == 503
                async with session.post(f"{base}/v1/completions", json=body) as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == 503
                events = (await stream.read()).decode().split("\n\n")
        await asyncio.wait_for(served, 5)
        return events

    events = asyncio.run(main())
    assert events[-2:] == ["data: [DONE]", ""]
    assert json.loads(events[-3].removeprefix("data: "))["choices"][0]["finish_reason"] == "abort"
    assert engine.shutdowns == [1.0] and not engine.is_alive and engine.running == 0
    assert engine.closed == [engine.calls[0].request_id]  # the aborted one finished, as "abort"


def test_requests_racing_shutdown_are_answered_at_once(tok) -> None:
    """Clients that poll /health while serve() shuts down get an answer or a refused
    connection, never a connection held unanswered until aiohttp's shutdown timeout."""
    slowest: list[float] = []

    def poll(base: str, stop: threading.Event) -> None:
        while not stop.is_set():
            start = time.monotonic()
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError):
                urllib.request.urlopen(f"{base}/health", timeout=10).close()
            slowest.append(time.monotonic() - start)

    async def shut_down_under_polls(port: int) -> float:
        engine = FakeEngine(tok)
        served = asyncio.create_task(serve(create_app(engine, ServerConfig()), "127.0.0.1",
                                           port, 1.0, engine))  # fmt: skip
        await asyncio.sleep(0.3)
        start = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(served, 10)
        return time.monotonic() - start

    for _ in range(8):  # 6 to 9 of 40 such shutdowns stranded a poll before the fix
        port, stop = free_port(), threading.Event()
        pollers = [threading.Thread(target=poll, args=(f"http://127.0.0.1:{port}", stop))
                   for _ in range(4)]  # fmt: skip
        for p in pollers:
            p.start()
        try:
            took = asyncio.run(shut_down_under_polls(port))
        finally:
            stop.set()
            for p in pollers:
                p.join(15)
        assert took < 2.0, f"serve() took {took:.2f} s to close"
    assert max(slowest) < 2.0, f"a poll waited {max(slowest):.2f} s"


# --- reasoning ---------------------------------------------------------------------------------


THOUGHT = "<think>\nThe capital of France.\n</think>\n\n"


@pytest.mark.parametrize(
    "parser, said, thought",
    [
        ("qwen3", THOUGHT + "Paris.", "\nThe capital of France.\n"),
        ("qwen3", "Paris.", None),  # thinking off: no block in the output
        ("deepseek_r1", THOUGHT.removeprefix("<think>") + "Paris.", "\nThe capital of France.\n"),
    ],
)
def test_reasoning_is_split_from_the_answer_whole_and_streamed(tok, parser, said, thought):
    engine = FakeEngine(tok)
    engine.reply = tok.encode(said)
    answer = said.rpartition("</think>")[2]
    with live_server(engine, ServerConfig(reasoning_parser=parser)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        kw = dict(model="smollm2-fake", messages=HELLO, max_tokens=64)
        message = client.chat.completions.create(**kw).choices[0].message
        assert (message.reasoning_content, message.content) == (thought, answer)
        deltas = [c.choices[0].delta for c in client.chat.completions.create(stream=True, **kw)]
        streamed = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
        assert streamed == (thought or "")
        assert "".join(d.content or "" for d in deltas) == answer
        # completions are not chat: their text stays whole
        text = client.completions.create(model="smollm2-fake", prompt="hi", max_tokens=64)
        assert text.choices[0].text == said


def test_reasoning_then_tool_calls_and_constrained_outputs_that_cannot_think(tok):
    engine = FakeEngine(tok)
    tools = [{"type": "function", "function": {"name": "get_time"}}]
    config = ServerConfig(tool_call_parser="hermes", reasoning_parser="deepseek_r1")
    with live_server(engine, config) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        engine.reply = tok.encode("Which zone?</think>" + HERMES)
        kw = dict(model="smollm2-fake", messages=HELLO, tools=tools, max_tokens=64)
        out = client.chat.completions.create(**kw).choices[0]
        assert out.message.reasoning_content == "Which zone?"
        assert out.message.content == "Checking.\n" and out.finish_reason == "tool_calls"
        assert out.message.tool_calls[0].function.arguments == '{"zone": "CET"}'
        chunks = list(client.chat.completions.create(stream=True, **kw))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == (
            "Which zone?"
        )
        assert "".join(d.content or "" for d in deltas) == "Checking.\n"
        assert [c.function.name for d in deltas for c in d.tool_calls or []] == ["get_time"]
        # a grammar holds from the first token: the whole output is the answer
        engine.reply = tok.encode('{"a": 1}')
        fmt = {"type": "json_object"}
        message = (
            client.chat.completions.create(
                model="smollm2-fake", messages=HELLO, max_tokens=64, response_format=fmt
            )
            .choices[0]
            .message
        )
        assert message.content == '{"a": 1}' and message.model_extra == {}
