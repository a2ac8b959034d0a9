"""Request parsing: every bad-input case of API.md's table, defaults, and the typed results."""

from __future__ import annotations

import dataclasses
import json
import logging
import random

import pytest
from conftest import smollm2_tokenizer

from runtime.sampling_params import SamplingParams, StructuredOutputs
from server.fields import ProtocolError, parse_body
from server.protocol import ModelInfo, chat_prompt, parse_chat, parse_completion
from server.token_requests import parse_detokenize, parse_tokenize
from server.tool_parsers import HermesCalls, Llama3JsonCalls

MAX_LEN = 64
DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "unrelated_key": 3}
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def info() -> ModelInfo:
    tok = smollm2_tokenizer()
    return ModelInfo("smol", MAX_LEN, len(tok), tok, DEFAULTS, max_n=4)


@pytest.fixture(scope="module")
def bare(info: ModelInfo) -> ModelInfo:
    """A token-id-only model: no tokenizer, no chat template."""
    return dataclasses.replace(info, tokenizer=None, vocab_size=1000)


def refused(parse, body: dict, info: ModelInfo, status: int = 400) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        parse(body, info)
    assert caught.value.status == status, caught.value.message
    return caught.value


def completion(**fields) -> dict:
    return {"model": "smol", "prompt": "one two three", "max_tokens": 4} | fields


def chat(**fields) -> dict:
    return {"model": "smol", "messages": HELLO, "max_tokens": 4} | fields


# --- the body itself --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type, raw",
    [
        ("application/json", b"{not json"),
        ("application/json", b""),
        ("application/json", b"[1, 2]"),
        ("application/json", b'"a string"'),
        ("application/json", b"null"),
        ("application/json", b'{"prompt": "\xff"}'),  # not UTF-8
        ("application/json", b'{"temperature": NaN}'),
        ("application/json", b"[" * 100_000 + b"]" * 100_000),  # nested past the recursion limit
        ("text/plain", b'{"prompt": "hi"}'),
        ("application/x-www-form-urlencoded", b"prompt=hi"),
    ],
)
def test_bad_body_is_400(content_type: str, raw: bytes) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_body(content_type, raw)
    assert caught.value.status == 400
    assert caught.value.type == "invalid_request_error"


def test_good_body_parses() -> None:
    assert parse_body("application/json", b'{"a": [1, 2.5]}') == {"a": [1, 2.5]}


# --- prompts and messages ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [None, "", [], [[]], [["a"]], ["a", [1]], [1, "a"], [[1], 2], {"text": "a"}, 5, [1.5], True],
)
def test_missing_empty_or_mistyped_prompt_is_400(info: ModelInfo, prompt) -> None:
    body = completion(prompt=prompt) if prompt is not None else {"max_tokens": 4}
    assert refused(parse_completion, body, info).param == "prompt"


@pytest.mark.parametrize(
    "messages",
    [
        None,
        [],
        "hello",
        ["hello"],
        [{"role": "function", "content": "x"}],
        [{"role": "tool", "content": "3"}],  # answering no call
        [{"role": "assistant", "content": None}],
        [{"role": "assistant", "content": "x", "tool_calls": {"id": "a"}}],
        [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
        [{"content": "x"}],
        [{"role": "user"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}],
        [{"role": "user", "content": [{"type": "text"}]}],
    ],
)
def test_missing_empty_or_bad_messages_are_400(info: ModelInfo, messages) -> None:
    body = chat(messages=messages) if messages is not None else {"max_tokens": 4}
    assert refused(parse_chat, body, info).param == "messages"


# --- types and ranges -------------------------------------------------------------------------

WRONG_TYPES = [
    ("temperature", "hot"),
    ("temperature", float("inf")),
    ("top_p", [1]),
    ("max_tokens", 1.5),
    ("max_tokens", True),
    ("max_completion_tokens", "8"),
    ("n", "2"),
    ("seed", 1.0),
    ("top_k", False),
    ("stream", "yes"),
    ("ignore_eos", 1),
    ("include_stop_str_in_output", "true"),
    ("skip_special_tokens", 0),
    ("stop", 5),
    ("stop", [1]),
    ("stop", [""]),
    ("stop_token_ids", 3),
    ("logit_bias", [1]),
    ("model", 5),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES)
def test_wrong_type_is_400_naming_the_field(info: ModelInfo, field: str, value) -> None:
    for parse, body in ((parse_completion, completion()), (parse_chat, chat())):
        assert refused(parse, body | {field: value}, info).param == field


OUT_OF_RANGE = [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"temperature": -0.01}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"n": 0}, "n"),
    ({"n": 5}, "n"),  # max_n is 4 here
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
]


@pytest.mark.parametrize("fields, param", OUT_OF_RANGE)
def test_out_of_range_is_400_naming_the_field(info: ModelInfo, fields: dict, param: str) -> None:
    for parse, body in ((parse_completion, completion()), (parse_chat, chat())):
        error = refused(parse, body | fields, info)
        assert error.param == param
        assert param in error.message


@pytest.mark.parametrize("value", [21, -1, 100])
def test_logprobs_out_of_range(info: ModelInfo, value: int) -> None:
    assert refused(parse_completion, completion(logprobs=value), info).param == "logprobs"
    body = chat(logprobs=True, top_logprobs=value)
    assert refused(parse_chat, body, info).param == "top_logprobs"


@pytest.mark.parametrize(
    "fields, param",
    [({"logprobs": 2}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs")],
)
def test_chat_logprobs_shape(info: ModelInfo, fields: dict, param: str) -> None:
    # chat's logprobs is a boolean; top_logprobs without it is refused, as OpenAI does
    assert refused(parse_chat, chat(**fields), info).param == param


@pytest.mark.parametrize(
    "field, low, high, low_open",
    [
        ("temperature", 0.0, 2.0, False),
        ("top_p", 0.0, 1.0, True),
        ("min_p", 0.0, 1.0, False),
        ("presence_penalty", -2.0, 2.0, False),
        ("frequency_penalty", -2.0, 2.0, False),
    ],
)
def test_random_float_values_follow_the_documented_ranges(
    info: ModelInfo, field: str, low: float, high: float, low_open: bool
) -> None:
    rng = random.Random(field)
    values = [low, high, *(rng.uniform(low - 1.5, high + 1.5) for _ in range(60))]
    for value in values:
        ok = (low < value if low_open else low <= value) and value <= high
        body = completion(**{field: value})
        if ok:
            params = parse_completion(body, info).prompts[0].params
            assert getattr(params, field) == value
        else:
            assert refused(parse_completion, body, info).param == field


# --- lengths and vocabulary -------------------------------------------------------------------


def test_prompt_plus_max_tokens_over_max_model_len_names_both_numbers(info: ModelInfo) -> None:
    ids = list(range(100, 160))  # 60 tokens
    error = refused(parse_completion, completion(prompt=ids, max_tokens=10), info)
    assert error.param == "max_tokens"
    for number in ("60", "10", str(MAX_LEN)):
        assert number in error.message
    error = refused(parse_chat, chat(max_completion_tokens=MAX_LEN), info)
    assert error.param == "max_completion_tokens"
    assert str(MAX_LEN) in error.message


def test_prompt_alone_over_max_model_len(info: ModelInfo) -> None:
    error = refused(parse_completion, {"prompt": list(range(MAX_LEN))}, info)
    assert str(MAX_LEN) in error.message
    error = refused(parse_chat, {"messages": [{"role": "user", "content": "x " * 80}]}, info)
    assert error.param == "messages"


def test_random_token_id_prompts(info: ModelInfo) -> None:
    """Random odd-length id prompts: valid exactly when every id is in [0, vocab) and it fits."""
    rng = random.Random(7)
    for _ in range(200):
        length = rng.choice([1, 3, 7, 33, 61])
        ids = [rng.randint(-2, info.vocab_size + 2) for _ in range(length)]
        if rng.random() < 0.5:
            ids = [i % info.vocab_size for i in ids]
        max_tokens = rng.choice([1, 3, 5])
        ok = all(0 <= i < info.vocab_size for i in ids) and length + max_tokens <= MAX_LEN
        body = completion(prompt=ids, max_tokens=max_tokens)
        if ok:
            assert parse_completion(body, info).prompts[0].token_ids == tuple(ids)
        else:
            refused(parse_completion, body, info)


@pytest.mark.parametrize("prompt", [[-1], [49152], [[5], [5, 49152]], [[True]]])
def test_token_ids_out_of_vocabulary_are_400(info: ModelInfo, prompt) -> None:
    assert refused(parse_completion, completion(prompt=prompt), info).param == "prompt"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"stop_token_ids": [49152]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {"49152": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"5": "1"}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [49152]}, "allowed_token_ids"),
        ({"allowed_token_ids": 5}, "allowed_token_ids"),
    ],
)
def test_vocabulary_checked_params_are_400(info: ModelInfo, fields: dict, param: str) -> None:
    for parse, body in ((parse_completion, completion()), (parse_chat, chat())):
        assert refused(parse, body | fields, info).param == param


def test_bad_words_are_read_as_strings_for_the_engine(caplog, info: ModelInfo) -> None:
    for parse, body in ((parse_completion, completion()), (parse_chat, chat())):
        fields = {"bad_words": ["hello", " big world"]}
        assert logged_ignored(caplog, parse, body | fields, info) == []
        params = parse(body | fields, info).prompts[0].params
        assert params.bad_words == ("hello", " big world")
        assert params.bad_words_token_ids == ()  # the engine tokenizes them
        for value in (None, []):
            assert parse(body | {"bad_words": value}, info).prompts[0].params.bad_words == ()
        for value in ("hello", {"a": 1}, 5, ["hello", 5], [["hello"]], ["ok", ""], [" "]):
            error = refused(parse, body | {"bad_words": value}, info)
            assert error.param == "bad_words", value
            assert "bad_words" in error.message, error.message


# --- other refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [None, False])
def test_stream_options_without_stream_is_400(info: ModelInfo, stream) -> None:
    fields = {"stream_options": {"include_usage": True}, "stream": stream}
    for parse, body in ((parse_completion, completion()), (parse_chat, chat())):
        assert refused(parse, body | fields, info).param == "stream_options"


def test_unknown_model_is_404(info: ModelInfo) -> None:
    for parse, body in ((parse_completion, completion()), (parse_chat, chat())):
        error = refused(parse, body | {"model": "gpt-5"}, info, status=404)
        assert error.param == "model"
        assert error.type == "not_found_error"
    refused(parse_tokenize, {"model": "gpt-5", "prompt": "a"}, info, status=404)


def test_suffix_is_400(info: ModelInfo) -> None:
    assert refused(parse_completion, completion(suffix="end"), info).param == "suffix"


def test_echo_with_logprobs_asks_for_prompt_logprobs(info: ModelInfo) -> None:
    req = parse_completion(completion(echo=True, logprobs=3, max_tokens=2), info)
    assert (req.prompts[0].params.prompt_logprobs, req.prompts[0].params.logprobs) == (3, 3)
    assert not req.echo_only and req.prompts[0].params.max_tokens == 2
    assert parse_completion(completion(logprobs=3), info).prompts[0].params.prompt_logprobs is None
    assert parse_completion(completion(echo=True), info).prompts[0].params.prompt_logprobs is None
    # max_tokens 0 with echo: the engine runs one token, which the response leaves out
    for key in ("max_tokens", "max_completion_tokens"):
        req = parse_completion(completion(echo=True, logprobs=1, **{key: 0}), info)
        assert req.echo_only and req.prompts[0].params.max_tokens == 1
        # the prompt is scored; the dropped token needs no logprobs
        assert (req.prompts[0].params.prompt_logprobs, req.prompts[0].params.logprobs) == (1, None)
        assert req.top_logprobs == 1
        error = refused(parse_completion, completion(echo=True, min_tokens=2, **{key: 0}), info)
        assert (error.param, str(error)) == (
            "min_tokens",
            f"'min_tokens' must be 0 when '{key}' is 0",
        )
    error = refused(parse_completion, completion(max_tokens=0), info)
    assert (error.param, str(error)) == ("max_tokens", "invalid max_tokens: 0 (must be >= 1)")
    assert refused(parse_completion, completion(echo=True, logprobs=21), info).param == "logprobs"


def test_model_without_tokenizer_takes_token_ids_only(bare: ModelInfo) -> None:
    assert refused(parse_completion, completion(), bare).param == "prompt"
    assert refused(parse_chat, chat(), bare).param == "messages"
    assert refused(parse_completion, completion(prompt=[1, 2], echo=True), bare).param == "echo"
    refused(parse_tokenize, {"prompt": "a"}, bare)
    refused(parse_detokenize, {"tokens": [1]}, bare)
    req = parse_completion(completion(prompt=[[1, 2], [999]]), bare)
    assert [p.token_ids for p in req.prompts] == [(1, 2), (999,)]


# --- what good requests become ----------------------------------------------------------------


def test_defaults_come_from_the_model_then_sampling_params(info: ModelInfo) -> None:
    params = parse_completion({"prompt": [1, 2, 3]}, info).prompts[0].params
    expected = SamplingParams(max_tokens=16, temperature=0.6, top_p=0.9)
    assert params == expected
    params = parse_chat(chat(temperature=0, top_p=1), info).prompts[0].params
    assert (params.temperature, params.top_p, params.greedy) == (0.0, 1.0, True)


def test_default_max_tokens_is_16_for_completions_and_what_fits_for_chat(info: ModelInfo):
    """OpenAI's and vLLM's defaults; the model's own default first; each capped at what fits
    in max_model_len."""
    req = parse_completion({"prompt": [[1] * 5, [2] * 50]}, info)
    assert [p.params.max_tokens for p in req.prompts] == [16, MAX_LEN - 50]
    capped = dataclasses.replace(info, default_params={"max_tokens": 30})
    req = parse_completion({"prompt": [[1] * 5, [2] * 40]}, capped)
    assert [p.params.max_tokens for p in req.prompts] == [30, MAX_LEN - 40]
    messages = {"model": "smol", "messages": HELLO}
    ids = chat_prompt(messages, info, special_default=False)
    assert parse_chat(messages, info).prompts[0].params.max_tokens == MAX_LEN - len(ids)
    assert parse_chat(messages, capped).prompts[0].params.max_tokens == 30


def test_priority_needs_the_priority_policy(info: ModelInfo) -> None:
    ordered = dataclasses.replace(info, priority_scheduling=True)
    for parse, body in ((parse_completion, {"prompt": "hi"}), (parse_chat, {"messages": HELLO})):
        assert parse(body, info).priority == 0 == parse(body | {"priority": 0}, info).priority
        assert parse(body | {"priority": -7}, ordered).priority == -7
        with pytest.raises(ProtocolError, match="--scheduling-policy priority") as e:
            parse(body | {"priority": 3}, info)
        assert (e.value.status, e.value.param) == (400, "priority")
        with pytest.raises(ProtocolError, match="integer"):
            parse(body | {"priority": "high"}, ordered)


def test_best_of_above_1_and_beam_search_are_400(info: ModelInfo) -> None:
    for parse, body in ((parse_completion, completion), (parse_chat, chat)):
        parse(body(best_of=1, use_beam_search=False), info)
        parse(body(best_of=None, use_beam_search=None), info)
        for value in (2, 0, "2"):
            assert refused(parse, body(best_of=value), info).param == "best_of"
        error = refused(parse, body(use_beam_search=True), info)
        assert error.param == "use_beam_search" and "beam search is not supported" in error.message


# every field the server reads, null or set: none of them is logged as ignored
SAMPLING = {
    "model": "smol", "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0.5,
    "top_p": 0.9, "min_p": 0.0, "presence_penalty": 0.1, "frequency_penalty": 0.1,
    "repetition_penalty": 1.1, "top_k": 5, "seed": 1, "n": 1, "min_tokens": 0,
    "ignore_eos": False, "include_stop_str_in_output": False, "skip_special_tokens": True,
    "stop": ["zz"], "stop_token_ids": [1], "logit_bias": {"5": 1}, "allowed_token_ids": None,
    "bad_words": ["zz"],
    "response_format": None, "structured_outputs": None, "guided_json": None,
    "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "truncate_prompt_tokens": 30, "return_token_ids": True, "return_tokens_as_token_ids": True,
    "priority": 0, "prompt_logprobs": None, "stream": True, "stream_options": None,
    "user": "u", "best_of": 1, "use_beam_search": False, "add_special_tokens": True,
}  # fmt: skip
KNOWN = [
    (parse_completion, SAMPLING | {"prompt": "hi", "echo": True, "logprobs": 1, "suffix": None}),
    # echo with max_tokens 0 parses a copy of the body: what is read of it counts too
    (parse_completion, {"prompt": [5, 6], "echo": True, "max_tokens": 0, "logprobs": 1,
                        "truncate_prompt_tokens": 9, "user": "u"}),
    (parse_chat, SAMPLING | {
        "messages": HELLO, "logprobs": True, "top_logprobs": 1, "tools": None,
        "tool_choice": "none", "parallel_tool_calls": False, "functions": None,
        "function_call": None, "add_generation_prompt": True, "continue_final_message": False,
        "chat_template_kwargs": {},
    }),
    (parse_tokenize, {"model": "smol", "prompt": "hi", "add_special_tokens": False,
                      "return_token_strs": True}),
    (parse_tokenize, {"messages": HELLO, "tools": None, "add_generation_prompt": True,
                      "continue_final_message": False, "chat_template_kwargs": {},
                      "add_special_tokens": False, "return_token_strs": False}),
    (parse_detokenize, {"model": "smol", "tokens": [1, 2]}),
]  # fmt: skip
IGNORED = "The following fields were present in the request but ignored: "


def logged_ignored(caplog, parse, body: dict, info: ModelInfo) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="server.fields"):
        parse(body, info)
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(IGNORED)]


@pytest.mark.parametrize("parse, body", KNOWN, ids=lambda x: getattr(x, "__name__", ""))
def test_fields_the_server_reads_are_not_logged_as_ignored(caplog, info, parse, body) -> None:
    assert logged_ignored(caplog, parse, body, info) == []


@pytest.mark.parametrize("parse, body", KNOWN, ids=lambda x: getattr(x, "__name__", ""))
def test_other_fields_are_accepted_and_logged_once(caplog, info, parse, body) -> None:
    unknown = {"length_penalty": 1.0, "zz_custom": {"a": 1}, "documents": None}
    logged = logged_ignored(caplog, parse, body | unknown, info)
    assert logged == [IGNORED + "{'documents', 'length_penalty', 'zz_custom'}"]


def test_fields_of_the_other_endpoint_are_ignored(caplog, info) -> None:
    """A field of chat's sent to completions (and the other way) is one the request ignores."""
    body = {"prompt": "hi", "max_tokens": 2, "messages": HELLO, "top_logprobs": 2}
    assert logged_ignored(caplog, parse_completion, body, info) == [
        IGNORED + "{'messages', 'top_logprobs'}"
    ]
    body = {"messages": HELLO, "max_tokens": 2, "prompt": "hi", "echo": True, "suffix": "x"}
    assert logged_ignored(caplog, parse_chat, body, info) == [
        IGNORED + "{'echo', 'prompt', 'suffix'}"
    ]


def test_prompt_logprobs_score_the_prompt_in_whole_responses(info: ModelInfo) -> None:
    for parse, body in ((parse_completion, {"prompt": "hi"}), (parse_chat, {"messages": HELLO})):
        req = parse(body | {"prompt_logprobs": 3}, info)
        assert req.prompt_logprobs == 3 and req.prompts[0].params.prompt_logprobs == 3
        assert parse(body, info).prompts[0].params.prompt_logprobs is None
        with pytest.raises(ProtocolError, match="streamed") as e:
            parse(body | {"prompt_logprobs": 3, "stream": True}, info)
        assert e.value.param == "prompt_logprobs"
        with pytest.raises(ProtocolError) as e:
            parse(body | {"prompt_logprobs": 21}, info)
        assert (e.value.status, e.value.param) == (400, "prompt_logprobs")
    # with echo's scoring: the engine ranks the larger k, each field shows its own
    echo = {"prompt": "hi", "echo": True, "logprobs": 5}
    req = parse_completion(echo | {"prompt_logprobs": 2}, info)
    assert (req.prompts[0].params.prompt_logprobs, req.prompt_logprobs, req.top_logprobs) == (
        5,
        2,
        5,
    )


def test_every_sampling_field_reaches_sampling_params(info: ModelInfo) -> None:
    fields = {
        "max_completion_tokens": 7,
        "max_tokens": 3,  # max_completion_tokens wins, as in OpenAI's API
        "temperature": 1.5,
        "top_p": 0.5,
        "top_k": 20,
        "min_p": 0.1,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "seed": 1234,
        "stop": "END",
        "stop_token_ids": [2, 7],
        "ignore_eos": True,
        "include_stop_str_in_output": True,
        "skip_special_tokens": False,
        "min_tokens": 2,
        "n": 3,
        "logit_bias": {"17": -100, "42": 5.5},
        "allowed_token_ids": [17, 42, 99],
        "user": "ignored",
        "unknown_field": "ignored too",
    }
    params = parse_completion(completion(**fields, logprobs=5), info).prompts[0].params
    assert params == SamplingParams(
        max_tokens=7, temperature=1.5, top_p=0.5, top_k=20, min_p=0.1, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, seed=1234, stop=("END",),
        stop_token_ids=(2, 7), ignore_eos=True, min_tokens=2, n=3, logprobs=5,
        logit_bias={17: -100.0, 42: 5.5}, allowed_token_ids=(17, 42, 99),
        include_stop_str_in_output=True, skip_special_tokens=False,
    )  # fmt: skip
    req = parse_chat(chat(**fields, logprobs=True, top_logprobs=4), info)
    assert (req.prompts[0].params.logprobs, req.top_logprobs, req.n) == (4, 4, 3)
    assert parse_chat(chat(logprobs=True), info).prompts[0].params.logprobs == 0


def test_completion_prompt_forms(info: ModelInfo) -> None:
    tok = info.tokenizer
    req = parse_completion(completion(prompt=["one two", "three"], n=2, echo=True), info)
    assert [p.token_ids for p in req.prompts] == [
        tuple(tok.encode("one two")),
        tuple(tok.encode("three")),
    ]
    assert [p.text for p in req.prompts] == ["one two", "three"]
    assert (req.n, req.echo, req.chat, req.stream) == (2, True, False, False)
    req = parse_completion(completion(prompt=[5, 6, 7], echo=True), info)
    assert req.prompts[0].text == tok.decode([5, 6, 7])  # echo needs the text of id prompts
    req = parse_completion(completion(prompt=[5, 6, 7]), info)
    assert req.prompts[0].text is None


def test_chat_prompt_is_the_templated_conversation(info: ModelInfo) -> None:
    tok = info.tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok", "name": "ignored"},
        {"role": "user", "content": "more"},
    ]
    plain = [m | {"content": "a\nb"} if i == 1 else m for i, m in enumerate(messages)]
    plain = [{"role": m["role"], "content": m["content"]} for m in plain]
    for add in (True, False):
        text = tok.apply_chat_template(plain, add_generation_prompt=add, tokenize=False)
        req = parse_chat(chat(messages=messages, add_generation_prompt=add), info)
        assert req.prompts[0].token_ids == tuple(tok.encode(text, add_special_tokens=False))
    assert text.endswith("more<|im_end|>\n")


def test_chat_template_kwargs_and_continue_final_message(templated: ModelInfo) -> None:
    tok = templated.tokenizer
    template = tok.chat_template
    tok.chat_template = "{% if greeting %}{{ greeting }};{% endif %}{{ eos_token }}" + template
    try:
        messages = [*HELLO, {"role": "assistant", "content": "The answer is"}]
        req = parse_chat(chat(messages=HELLO, chat_template_kwargs={"greeting": "hi"}), templated)
        assert prompt_text(req, templated) == "hi;<|im_end|>user: hello;"
        # only the template's own variables: never a template, options or special tokens
        sneaky = {"chat_template": "{{ 7 * 7 }}", "eos_token": "X", "tokenize": True, "n": 1}
        req = parse_chat(chat(messages=HELLO, chat_template_kwargs=sneaky), templated)
        assert prompt_text(req, templated) == "<|im_end|>user: hello;"
        # the last message stays open for the model to go on with (the template's ";" after
        # it is cut, as transformers does), and no generation prompt follows
        req = parse_chat(chat(messages=messages, continue_final_message=True), templated)
        assert prompt_text(req, templated) == "<|im_end|>user: hello;assistant: The answer is"
    finally:
        tok.chat_template = template
    both = chat(messages=messages, continue_final_message=True, add_generation_prompt=True)
    assert refused(parse_chat, both, templated).param == "continue_final_message"
    wrong = chat(chat_template_kwargs=["greeting"])
    assert refused(parse_chat, wrong, templated).param == "chat_template_kwargs"


def test_streaming_flags(info: ModelInfo) -> None:
    req = parse_chat(chat(stream=True, stream_options={"include_usage": True}), info)
    assert (req.stream, req.include_usage) == (True, True)
    req = parse_completion(completion(stream=True), info)
    assert (req.stream, req.include_usage) == (True, False)
    body = chat(stream=True, stream_options={"include_usage": "yes"})
    assert refused(parse_chat, body, info).param == "include_usage"
    every = {"include_usage": True, "continuous_usage_stats": True}
    assert parse_chat(chat(stream=True, stream_options=every), info).continuous_usage
    alone = {"continuous_usage_stats": True}  # as vLLM: only with include_usage
    assert not parse_chat(chat(stream=True, stream_options=alone), info).continuous_usage


def test_truncate_prompt_tokens_keeps_the_prompts_end(info: ModelInfo) -> None:
    tok = info.tokenizer
    text = "one two three four five six"
    ids = tok.encode(text)
    req = parse_completion({"prompt": text, "truncate_prompt_tokens": 3, "max_tokens": 2}, info)
    assert list(req.prompts[0].token_ids) == ids[-3:]
    assert req.prompts[0].text == tok.decode(ids[-3:])  # what echo shows
    body = {"prompt": ids, "echo": True, "truncate_prompt_tokens": 2, "max_tokens": 2}
    assert parse_completion(body, info).prompts[0].text == tok.decode(ids[-2:])
    long = {"prompt": text, "truncate_prompt_tokens": 100, "max_tokens": 2}
    assert list(parse_completion(long, info).prompts[0].token_ids) == ids
    templated = parse_chat({"messages": HELLO, "max_tokens": 2}, info).prompts[0].token_ids
    req = parse_chat({"messages": HELLO, "max_tokens": 2, "truncate_prompt_tokens": 4}, info)
    assert req.prompts[0].token_ids == templated[-4:]
    # a prompt longer than max_model_len fits once truncated
    over = {"prompt": [5] * (MAX_LEN + 10), "max_tokens": 4, "truncate_prompt_tokens": 8}
    assert len(parse_completion(over, info).prompts[0].token_ids) == 8
    for bad_k in (0, -2):
        body = {"prompt": text, "truncate_prompt_tokens": bad_k}
        assert refused(parse_completion, body, info).param == "truncate_prompt_tokens"


def test_truncate_prompt_tokens_minus_1_is_max_model_len(info: ModelInfo) -> None:
    """vLLM's -1: truncate to max_model_len; a prompt that fits is whole, a longer one is cut to
    max_model_len tokens, which leave no room for a completion (the prompt's 400, not the
    field's)."""
    ids = info.tokenizer.encode("one two three four five six")
    body = {"prompt": ids, "truncate_prompt_tokens": -1, "max_tokens": 2}
    assert list(parse_completion(body, info).prompts[0].token_ids) == ids
    over = list(range(100, 100 + MAX_LEN + 10))
    error = refused(parse_completion, body | {"prompt": over}, info)
    assert error.param == "prompt" and f"the prompt is {MAX_LEN} tokens" in error.message
    req = parse_chat({"messages": HELLO, "max_tokens": 2, "truncate_prompt_tokens": -1}, info)
    assert req.prompts[0].token_ids == parse_chat(chat(max_tokens=2), info).prompts[0].token_ids


def test_tokenize_and_detokenize_bodies(info: ModelInfo) -> None:
    tok = info.tokenizer
    req = parse_tokenize({"prompt": "Hello world"}, info)
    assert (req.token_ids, req.token_strs) == (tok.encode("Hello world"), False)
    assert parse_tokenize({"prompt": "Hello", "return_token_strs": True}, info).token_strs
    req = parse_tokenize({"model": "smol", "messages": HELLO, "return_token_strs": True}, info)
    ids = req.token_ids
    assert req.token_strs
    text = tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)
    assert parse_detokenize({"tokens": [1, 2, 3]}, info) == [1, 2, 3]
    refused(parse_tokenize, {}, info)
    refused(parse_tokenize, {"prompt": 5}, info)
    refused(parse_tokenize, {"prompt": "a", "return_token_strs": 1}, info)
    refused(parse_detokenize, {"tokens": [49152]}, info)
    refused(parse_detokenize, {"tokens": "abc"}, info)


# --- structured outputs -----------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}}


@pytest.mark.parametrize("parse, body", [(parse_chat, chat), (parse_completion, completion)])
def test_response_format_and_structured_outputs_become_the_spec(info, parse, body) -> None:
    def spec(**fields):
        return parse(body(**fields), info).prompts[0].params.structured_outputs

    assert spec() is None and spec(response_format={"type": "text"}) is None
    assert spec(response_format={"type": "json_object"}) == StructuredOutputs(json_object=True)
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    assert spec(response_format=schema) == StructuredOutputs(json=SCHEMA)
    assert spec(structured_outputs={"regex": "[ab]+"}) == StructuredOutputs(regex="[ab]+")
    choice = spec(structured_outputs={"choice": ["x", "y"]})
    assert choice == StructuredOutputs(choice=("x", "y"))
    # vLLM's older fields, which vLLM itself now ignores
    assert spec(guided_json=SCHEMA) == StructuredOutputs(json=SCHEMA)
    assert spec(guided_regex="[ab]+") == StructuredOutputs(regex="[ab]+")
    assert spec(guided_choice=["x", "y"]) == choice
    assert spec(guided_grammar='root ::= "a"') == StructuredOutputs(grammar='root ::= "a"')
    # a plain-text response format constrains nothing, and may come with a spec
    text = {"type": "text"}
    assert spec(response_format=text, guided_regex="a") == StructuredOutputs(regex="a")
    assert spec(response_format=text, structured_outputs={"regex": "a"}) == StructuredOutputs(
        regex="a"
    )


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"response_format": {"type": "xml"}}, "response_format", "'response_format.type' must"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "must be an object"),
        ({"response_format": "json"}, "response_format", "'response_format' must be an object"),
        ({"structured_outputs": {"regex": 1}}, "structured_outputs", "regex must be a string"),
        ({"structured_outputs": {"jsonn": {}}}, "structured_outputs", "unknown structured"),
        ({"structured_outputs": {}}, "structured_outputs", "set exactly one of"),
        (
            {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
            "response_format",
            "not several",
        ),
        (
            {"guided_regex": "a", "structured_outputs": {"regex": "a"}},
            "structured_outputs",
            "set one of 'structured_outputs', 'guided_regex', not several",
        ),
        ({"guided_regex": 1}, "guided_regex", "regex must be a string"),
        ({"guided_choice": []}, "guided_choice", "choice"),
        ({"structured_outputs": {"regex": "a"}, "min_tokens": 1}, "min_tokens", "min_tokens"),
    ],
)
def test_bad_structured_outputs_are_400(info, fields, param, message) -> None:
    error = refused(parse_chat, chat(**fields), info)
    assert error.param == param and message in str(error)


# --- tools ------------------------------------------------------------------------------------

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    },
}
NOW = {"type": "function", "function": {"name": "now"}}
# a template that shows what it is given: the tools, then each message with its tool calls
TOOLS_TEMPLATE = (
    "{% for t in tools or [] %}tool {{ t.function.name }};{% endfor %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content }}"
    "{% for c in m.tool_calls or [] %} call {{ c.id }} {{ c.function.name }}"
    "({{ c.function.arguments.a }}){% endfor %}"
    "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %};{% endfor %}"
)


@pytest.fixture(scope="module")
def templated(info: ModelInfo) -> ModelInfo:
    tok = smollm2_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    return dataclasses.replace(info, tokenizer=tok)


def prompt_text(req, info: ModelInfo) -> str:
    return info.tokenizer.decode(req.prompts[0].token_ids)


def test_tools_messages_and_calls_reach_the_template(templated: ModelInfo) -> None:
    messages = [
        {"role": "developer", "content": "Be exact."},
        {"role": "user", "content": "1 + 2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 3}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    req = parse_chat(chat(messages=messages, tools=[ADD, NOW], tool_choice="none"), templated)
    assert prompt_text(req, templated) == (
        "tool add;tool now;system: Be exact.;user: 1 + 2?;assistant:  call c1 add(3);"
        "tool: 3 for c1;"
    )
    assert req.tool_choice is None and req.prompts[0].params.structured_outputs is None
    # /tokenize counts the prompt the chat request has, tools shown
    body = {"model": "smol", "messages": messages, "tools": [ADD, NOW]}
    assert tuple(parse_tokenize(body, templated).token_ids) == req.prompts[0].token_ids


def test_a_forced_tool_choice_becomes_the_spec(info: ModelInfo) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    req = parse_chat(chat(tools=[ADD, NOW], tool_choice=named), info)
    params = ADD["function"]["parameters"]
    assert req.prompts[0].params.structured_outputs == StructuredOutputs(json=params)
    content, calls = req.tool_choice.message('{"a": 1}')
    assert content is None and calls[0]["function"] == {"name": "add", "arguments": '{"a": 1}'}
    for parallel, most in ((True, None), (False, 1)):
        body = chat(tools=[ADD, NOW], tool_choice="required", parallel_tool_calls=parallel)
        req = parse_chat(body, info)
        schema = json.loads(req.prompts[0].params.structured_outputs.json)
        assert schema["minItems"] == 1 and schema.get("maxItems") == most
        one_of = schema["items"]["anyOf"]
        assert [c["properties"]["name"] for c in one_of] == [{"const": "add"}, {"const": "now"}]
        assert one_of[0]["properties"]["parameters"] == params
        assert one_of[1]["properties"]["parameters"] == {"type": "object", "properties": {}}
    content, calls = req.tool_choice.message('[{"name": "now", "parameters": {}}]')
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [("now", "{}")]
    assert content is None and req.tool_choice.finish_reason("stop", True) == "tool_calls"
    cut = '[{"name": "now", "param'  # cut short by max_tokens: the text, no calls
    assert req.tool_choice.message(cut) == (cut, None)


def test_required_calls_take_their_tools_definitions_to_the_top(info: ModelInfo) -> None:
    unit = {"enum": ["C", "F"]}
    temp = {
        "type": "function",
        "function": {
            "name": "temp",
            "parameters": {
                "$defs": {"Unit": unit},
                "type": "object",
                "properties": {"unit": {"$ref": "#/$defs/Unit"}},
                "required": ["unit"],
            },
        },
    }
    req = parse_chat(chat(tools=[temp, NOW], tool_choice="required"), info)
    schema = json.loads(req.prompts[0].params.structured_outputs.json)
    assert schema["$defs"] == {"Unit": unit}
    assert "$defs" not in schema["items"]["anyOf"][0]["properties"]["parameters"]
    xgrammar = pytest.importorskip("xgrammar")  # and the engine's compiler takes it
    tok_info = xgrammar.TokenizerInfo.from_huggingface(info.tokenizer)
    compiled = xgrammar.GrammarCompiler(tok_info).compile_json_schema(json.dumps(schema))
    matcher = xgrammar.GrammarMatcher(compiled)
    assert matcher.accept_string('[{"name": "temp", "parameters": {"unit": "F"}}]')
    other = {"type": "function", "function": {"name": "o", "parameters": {"$defs": {"Unit": {}}}}}
    error = refused(parse_chat, chat(tools=[temp, other], tool_choice="required"), info)
    assert error.param == "tools" and "define $defs 'Unit' differently" in str(error)
    rooted = {"type": "object", "properties": {"a": {"$ref": "#/properties/b"}, "b": {}}}
    rooted = {"type": "function", "function": {"name": "r", "parameters": rooted}}
    error = refused(parse_chat, chat(tools=[rooted], tool_choice="required"), info)
    assert error.param == "tools" and "not '#/properties/b'" in str(error)


def test_nulls_are_absent_and_auto_keeps_special_tokens(info: ModelInfo) -> None:
    bare = {"type": "function", "function": {"name": "now", "parameters": None}}
    body = chat(tools=[bare], tool_choice="required", parallel_tool_calls=None)
    schema = json.loads(parse_chat(body, info).prompts[0].params.structured_outputs.json)
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == {
        "type": "object",
        "properties": {},
    }
    auto = dataclasses.replace(info, tool_call_parser="hermes")
    req = parse_chat(chat(tools=[bare]), auto)  # a model may mark its call tags special
    assert isinstance(req.tool_choice, HermesCalls) and req.tool_choice.parallel
    assert req.prompts[0].params.skip_special_tokens is False
    assert req.prompts[0].params.structured_outputs is None
    req = parse_chat(chat(tools=[bare], parallel_tool_calls=False, skip_special_tokens=True), auto)
    assert not req.tool_choice.parallel and req.prompts[0].params.skip_special_tokens
    llama = dataclasses.replace(info, tool_call_parser="llama3_json")
    req = parse_chat(chat(tools=[bare]), llama)
    assert isinstance(req.tool_choice, Llama3JsonCalls)
    assert req.prompts[0].params.skip_special_tokens is False


@pytest.mark.parametrize(
    "fields, param, message",
    [
        ({"functions": [ADD["function"]]}, "functions", "use 'tools' and 'tool_choice'"),
        ({"tools": [ADD]}, "tool_choice", "needs the server started with"),
        ({"tools": [ADD], "tool_choice": "auto"}, "tool_choice", "needs the server started with"),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": [], "tool_choice": "none"}, "tools", "non-empty array"),
        ({"tools": [{"type": "x"}], "tool_choice": "none"}, "tools", "tools[0] must be"),
        ({"tools": [NOW, NOW], "tool_choice": "none"}, "tools", "a second function"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools",
            "JSON schema object",
        ),
        ({"tools": [ADD], "tool_choice": "any"}, "tool_choice", "must be 'none'"),
        (
            {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "sub"}}},
            "tool_choice",
            "not among the tools",
        ),
        (
            {"tools": [ADD], "tool_choice": "required", "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
            "boolean",
        ),
        (
            {"tools": [ADD], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "cannot go with response_format",
        ),
    ],
)
def test_bad_tools_are_400(info, fields, param, message) -> None:
    error = refused(parse_chat, chat(**fields), info)
    assert error.param == param and message in str(error)
