"""`kiln run` end to end: the real server process, the real engine, the official client."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request

import openai
import pytest
from serving import start_kiln

pytestmark = pytest.mark.slow
KEY = "sk-kiln-e2e"  # the server's --api-key


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    # steps of at most 256 tokens: an abort lands between steps, and a 2048-token prefill step
    # takes seconds on a CPU
    proc, url, _ = start_kiln(
        smollm2_artifact, "--served-model-name", "smol", "--shutdown-timeout", "5",
        "--max-num-batched-tokens", "256", "--api-key", KEY,
    )  # fmt: skip
    yield proc, url
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0)


CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_and_completion_streamed_equal_plain(client):
    plain = client.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=24, temperature=0
    )
    assert "Paris" in plain.choices[0].message.content
    chunks = client.chat.completions.create(
        model="smol",
        messages=CHAT,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for c in chunks:
        if c.choices:
            text += c.choices[0].delta.content or ""
            finish = c.choices[0].finish_reason or finish
        if c.usage:
            usage = c.usage
    assert text == plain.choices[0].message.content
    assert finish == plain.choices[0].finish_reason
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    comp = client.completions.create(
        model="smol", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0
    )
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="smol", prompt="1, 2, 3, 4,", max_tokens=12, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == comp.choices[0].text
    assert comp.usage.completion_tokens == 12


def test_n_stop_and_logprobs(client):
    out = client.completions.create(
        model="smol",
        prompt="Count: 1, 2, 3,",
        max_tokens=16,
        temperature=0.8,
        n=2,
        seed=3,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 2 * 16
    stopped = client.completions.create(
        model="smol", prompt="Count: 1, 2, 3,", max_tokens=32, temperature=0, stop=[" 6"]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert " 6" not in stopped.choices[0].text and "5" in stopped.choices[0].text
    lp = client.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = lp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)  # greedy: the top one


def test_echo_scores_a_continuation_as_generation_would(client):
    # a loglikelihood as lm-evaluation-harness asks for one: echo, max_tokens 0 or 1, logprobs 1
    context = "The capital of France is"
    nxt = client.completions.create(
        model="smol", prompt=context, max_tokens=1, temperature=0, logprobs=1
    )
    answer = nxt.choices[0].logprobs
    assert answer.tokens == [" Paris"]
    for max_tokens in (0, 1):
        scored = client.completions.create(
            model="smol", prompt=context + " Paris", max_tokens=max_tokens, temperature=0,
            logprobs=1, echo=True,
        )  # fmt: skip
        lp = scored.choices[0].logprobs
        n = len(lp.tokens) - max_tokens  # the prompt's tokens
        assert lp.tokens[n - 1] == " Paris" and lp.token_logprobs[0] is None
        # " Paris" scored inside the prompt: the logprob it had as the greedy next token
        assert lp.token_logprobs[n - 1] == pytest.approx(answer.token_logprobs[0], abs=1e-4)
        assert lp.token_logprobs[n - 1] == max(lp.top_logprobs[n - 1].values())
        assert all(x <= 0 for x in lp.token_logprobs[1:])
    assert scored.usage.completion_tokens == 1


def test_structured_outputs_through_the_openai_client(client):
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string"}, "country": {"type": "string"}},
        "required": ["capital", "country"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = client.chat.completions.create(
        model="smol", messages=CHAT, max_tokens=64, temperature=0, response_format=fmt
    )
    answer = json.loads(out.choices[0].message.content)
    assert set(answer) >= {"capital", "country"} and "Paris" in answer["capital"]
    picked = client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=8, temperature=1.0,
        seed=4, n=3, extra_body={"structured_outputs": {"choice": ["Paris", "Lyon"]}},
    )  # fmt: skip
    assert {c.text for c in picked.choices} <= {"Paris", "Lyon"}
    with pytest.raises(openai.BadRequestError, match="parenthesis is not closed"):
        client.completions.create(
            model="smol", prompt="x", extra_body={"structured_outputs": {"regex": "("}}
        )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def test_forced_tool_calls_through_the_openai_client(client):
    ask = [{"role": "user", "content": "What is the weather in Paris for 3 days?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    kw = dict(model="smol", messages=ask, tools=[WEATHER, TIME], max_tokens=64, temperature=0)
    first = client.chat.completions.create(tool_choice=named, **kw)
    out = first.choices[0]
    (call,) = out.message.tool_calls
    assert call.function.name == "get_weather" and call.type == "function" and call.id
    arguments = json.loads(call.function.arguments)  # the schema's: a string, an integer
    assert set(arguments) == {"city", "days"} and type(arguments["days"]) is int
    assert isinstance(arguments["city"], str)
    assert out.message.content is None and out.finish_reason == "stop"
    # streamed: the call's id and name first, then its arguments as they come
    chunks = list(client.chat.completions.create(tool_choice=named, stream=True, **kw))
    deltas = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "stop"
    # required: one or more calls of any tool, each with its parameters
    for stream in (False, True):
        got = client.chat.completions.create(tool_choice="required", stream=stream, **kw)
        if stream:
            chunks = list(got)
            calls = [d for c in chunks for d in c.choices[0].delta.tool_calls or []]
            finish = chunks[-1].choices[0].finish_reason
        else:
            calls, finish = got.choices[0].message.tool_calls, got.choices[0].finish_reason
        assert finish == "tool_calls" and calls and all(c.id for c in calls)
        for c in calls:  # each call one of the tools, with its parameters
            assert c.function.name in ("get_weather", "get_time")
            if c.function.name == "get_weather":
                assert set(json.loads(c.function.arguments)) == {"city", "days"}
            else:
                assert json.loads(c.function.arguments) == {}
    # the conversation goes on with the call and its result
    history = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ]
    reply = client.chat.completions.create(
        **(kw | {"messages": history, "max_tokens": 8}), tool_choice="none"
    )  # the call and its answer reach the prompt; the model answers in text
    assert reply.usage.prompt_tokens > first.usage.prompt_tokens + 10
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="needs the server started with") as e:
        client.chat.completions.create(model="smol", messages=ask, tools=[WEATHER])
    assert e.value.body["param"] == "tool_choice"


def test_bad_input_then_good(client, server):
    stranger = openai.OpenAI(base_url=server[1] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="hi", max_tokens=2, seed=2**64)
    assert e.value.body["param"] == "seed"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="hi", max_tokens=100000)
    assert "8192" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smol", prompt="hi", max_tokens=2, temperature=5)
    assert e.value.body["param"] == "temperature"
    ok = client.completions.create(model="smol", prompt="hi", max_tokens=2, temperature=0)
    assert ok.usage.completion_tokens == 2


async def _abandon(url: str, n: int) -> None:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=0.5)

    async def one(i: int) -> None:
        try:
            stream = await client.chat.completions.create(
                model="smol",
                messages=[{"role": "user", "content": f"Tell me a long story, number {i}."}],
                max_tokens=500,
                stream=True,
            )
            async for _ in stream:
                pass
        except (openai.APITimeoutError, openai.APIConnectionError):
            pass

    await asyncio.gather(*(one(i) for i in range(n)))
    await client.close()


def test_abandoned_streams_free_everything(client, server):
    asyncio.run(_abandon(server[1], 100))
    start = time.monotonic()
    out = client.completions.create(
        model="smol", prompt="Hello", max_tokens=8, temperature=0, timeout=5
    )
    assert out.usage.completion_tokens == 8 and time.monotonic() - start < 5
    deadline = time.monotonic() + 10
    while True:
        metrics = urllib.request.urlopen(server[1] + "/metrics", timeout=5).read().decode()
        running = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("kiln:num_requests_running")
        )
        usage = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("kiln:kv_cache_usage_perc")
        )
        if (running == 0 and usage == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert running == 0 and usage == 0.0


def test_sigterm_during_streaming_exits_cleanly(smollm2_artifact):
    proc, url, _ = start_kiln(smollm2_artifact, "--shutdown-timeout", "2")
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    stream = client.completions.create(
        model=smollm2_artifact.name,
        prompt="Once upon a time",
        max_tokens=2000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    finish = None
    for chunk in stream:  # the stream ends: with a finish_reason, or a clean close
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert proc.wait(timeout=15) == 0
    assert finish in ("abort", "length", "stop")


def test_engine_flags_reach_the_engine_config():
    from kiln.cli import _engine_config, parser

    args = parser().parse_args(["run", "art", "--enforce-eager", "--no-async-scheduling"])
    config = _engine_config(args)
    assert not config.cuda_graphs and config.async_scheduling is False
    default = _engine_config(parser().parse_args(["run", "art"]))
    assert default.cuda_graphs and default.async_scheduling is None  # on for a GPU runner
    assert default.mixed_graphs
    assert not _engine_config(
        parser().parse_args(["run", "art", "--decode-graphs-only"])
    ).mixed_graphs
    assert default.policy == "fcfs"
    args = parser().parse_args(["run", "art", "--scheduling-policy", "priority"])
    assert _engine_config(args).policy == "priority"


def test_auto_tool_choice_needs_a_parser(caplog):
    from kiln.cli import main

    assert main(["run", "missing-artifact", "--enable-auto-tool-choice"]) == 2
    assert "--enable-auto-tool-choice needs --tool-call-parser" in caplog.text
    assert main(["run", "missing-artifact", "--tool-call-parser", "hermes"]) == 2  # no artifact
    assert "reads calls only with --enable-auto-tool-choice" in caplog.text
