"""Tool calls out of the model's text: the hermes parser's content and calls, streamed in any
pieces or read whole, agree; forced calls stream as they are made."""

from __future__ import annotations

import json
import random

import pytest

from server import tool_parsers
from server.tool_parsers import HermesCalls, Llama3JsonCalls
from server.tools import ForcedCalls

CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "é"}}\n</tool_call>'
NOW = '<tool_call>{"name": "now"}</tool_call>'
TEXTS = {  # text -> (content, [(name, arguments)])
    "plain answer, no tags": ("plain answer, no tags", []),
    "Let me add.\n" + CALL: ("Let me add.\n", [("add", '{"a": 1, "b": "é"}')]),
    CALL + "\n" + NOW + "\n": ("", [("add", '{"a": 1, "b": "é"}'), ("now", "{}")]),
    # text between or after calls is content; a block that is no call stays text
    # after a call: whitespace alone separates; with text, it is content, all of it
    CALL + "  \n" + NOW + " \n": ("", [("add", '{"a": 1, "b": "é"}'), ("now", "{}")]),
    CALL + "  so \n " + NOW + "\n ok": (
        "  so \n \n ok",
        [("add", '{"a": 1, "b": "é"}'), ("now", "{}")],
    ),
    CALL + " then <tool_call>oops</tool_call>": (
        " then <tool_call>oops</tool_call>",
        [("add", '{"a": 1, "b": "é"}')],
    ),
    "a < b <tool_call": ("a < b <tool_call", []),  # a tag's start that never completes
    # cut by max_tokens: a call if what came is one, else text
    'x<tool_call>{"name": "now", "arguments": "{}"}': ("x", [("now", "{}")]),
    'x<tool_call>{"name": "no': ('x<tool_call>{"name": "no', []),
    '<tool_call>{"arguments": {}}</tool_call>': ('<tool_call>{"arguments": {}}</tool_call>', []),
    # arguments under "parameters", as some models write them; none at all; not an object
    '<tool_call>{"name": "w", "parameters": {"city": "Paris"}}</tool_call>': (
        "",
        [("w", '{"city": "Paris"}')],
    ),
    '<tool_call>{"name": "now", "arguments": null}</tool_call>': ("", [("now", "{}")]),
    '<tool_call>{"name": "w", "arguments": [1]}</tool_call>': (
        '<tool_call>{"name": "w", "arguments": [1]}</tool_call>',
        [],
    ),
}


def streamed(parser, text, rng, longest, splits):
    """`text` streamed through `parser` in one-character pieces, then in `splits` random
    splits (pieces of 1..`longest`): per run, the content, the (name, arguments) calls, and
    whether the last delta said calls were made."""
    runs = [[1] * len(text)] + [[rng.randint(1, longest) for _ in text] for _ in range(splits)]
    for sizes in runs:
        stream, pos, content, calls, called = parser.stream(), 0, "", [], False
        while pos < len(text):
            piece, pos = text[pos : pos + sizes[0]], pos + sizes.pop(0)
            delta, called = stream.delta(0, piece, finished=pos >= len(text))
            content += delta.get("content", "")
            for call in delta.get("tool_calls", []):
                assert call["index"] == len(calls) and call["id"]
                calls.append((call["function"]["name"], call["function"]["arguments"]))
        yield content, calls, called


@pytest.mark.parametrize("text", TEXTS)
def test_hermes_calls_read_whole(text):
    content, calls = HermesCalls().message(text)
    want_content, want_calls = TEXTS[text]
    assert content == (want_content or None)
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in calls or []]
    assert got == want_calls
    assert all(
        c["type"] == "function" and c["id"].startswith("chatcmpl-tool-") for c in calls or []
    )
    assert HermesCalls().finish_reason("stop", bool(calls)) == ("tool_calls" if calls else "stop")


@pytest.mark.parametrize("text", TEXTS)
def test_hermes_calls_streamed_in_any_pieces_equal_read_whole(text):
    want_content, want_calls = TEXTS[text]
    for content, calls, called in streamed(HermesCalls(), text, random.Random(0), 6, 20):
        assert (content, calls, called) == (want_content, want_calls, bool(want_calls))


def test_a_stream_holds_back_only_what_may_start_a_call():
    stream = HermesCalls().stream()
    assert stream.delta(0, "Sure <tool", False) == ({"content": "Sure "}, False)
    assert stream.delta(0, "box", False) == ({"content": "<toolbox"}, False)
    # choices are streamed apart
    assert stream.delta(1, "<tool_call>", False) == ({}, False)
    delta, called = stream.delta(1, '{"name": "now"}</tool_call>\n\n', False)
    assert called and delta["tool_calls"][0]["function"] == {"name": "now", "arguments": "{}"}
    assert stream.delta(1, "", True) == ({}, True)  # the whitespace after a call is dropped


def test_forced_calls_stream_as_they_are_made():
    named = ForcedCalls("add", {"type": "object"}).stream()
    first, called = named.delta(0, '{"a"', False)
    (call,) = first["tool_calls"]
    assert called and call["index"] == 0 and call["id"] and call["function"]["name"] == "add"
    assert call["function"]["arguments"] == '{"a"'
    assert named.delta(0, ": 1}", True) == (
        {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
        True,
    )
    required = ForcedCalls(None, {"type": "array"}).stream()
    text = json.dumps([{"name": "now", "parameters": {}}, {"name": "add", "parameters": {"a": 1}}])
    assert required.delta(0, text[:9], False) == ({}, False)  # whole calls, at the end
    delta, called = required.delta(0, text[9:], True)
    got = [
        (c["index"], c["function"]["name"], c["function"]["arguments"]) for c in delta["tool_calls"]
    ]
    assert called and got == [(0, "now", "{}"), (1, "add", '{"a": 1}')]
    cut = ForcedCalls(None, {"type": "array"}).stream()
    assert cut.delta(0, '[{"name": "n', True) == ({"content": '[{"name": "n'}, False)


def test_without_parallel_calls_only_the_first_is_made():
    text = "Two.\n" + CALL + "\n" + NOW
    content, calls = HermesCalls(parallel=False).message(text)
    assert content == "Two.\n" and [c["function"]["name"] for c in calls] == ["add"]
    stream, made = HermesCalls(parallel=False).stream(), []
    for k in range(0, len(text), 7):
        delta, called = stream.delta(0, text[k : k + 7], k + 7 >= len(text))
        made += delta.get("tool_calls", [])
    assert called and [(c["index"], c["function"]["name"]) for c in made] == [(0, "add")]


def test_a_long_stream_scans_each_piece_of_text_once(monkeypatch):
    scanned = []
    real = HermesCalls.scan
    monkeypatch.setattr(
        HermesCalls,
        "scan",
        lambda self, text, *a: scanned.append(len(text)) or real(self, text, *a),
    )
    stream, answer = HermesCalls().stream(), "plain words, no calls at all " * 400
    for k in range(0, len(answer), 4):
        stream.delta(0, answer[k : k + 4], k + 4 >= len(answer))
    assert max(scanned) <= 4 + len(HermesCalls.START)  # the new piece, and a tag's start


def test_a_long_stream_parses_each_block_once(monkeypatch):
    parsed = []
    real = tool_parsers._hermes_call
    monkeypatch.setattr(
        tool_parsers, "_hermes_call", lambda block: parsed.append(block) or real(block)
    )
    text = "".join(
        f'<tool_call>{{"name": "f{i}", "arguments": {{}}}}</tool_call>' for i in range(50)
    )
    stream = HermesCalls().stream()
    for k in range(0, len(text), 4):
        stream.delta(0, text[k : k + 4], k + 4 >= len(text))
    assert len(parsed) == 50  # each finished call is parsed once, not at every delta


LLAMA = {  # text -> (content, [(name, arguments)])
    "The sky is blue.": ("The sky is blue.", []),
    '{"name": "add", "parameters": {"a": 1}}': (None, [("add", '{"a": 1}')]),
    '<|python_tag|>{"name": "now", "parameters": {}}; {"name": "add", "arguments": "{}"}': (
        None,
        [("now", "{}"), ("add", "{}")],
    ),
    ' \n{"name": "now"}': (None, [("now", "{}")]),
    '{"name": "now"};': (None, [("now", "{}")]),  # a ";" after the last call, as vLLM allows
    '{"name": "now", "arguments": null, "parameters": {"a": 2}}': (None, [("now", '{"a": 2}')]),
    # not calls: the whole output is content
    '{"name": "add", "parameters": {"a": 1': ('{"name": "add", "parameters": {"a": 1', []),
    '{"a": 1}': ('{"a": 1}', []),
    '{"name": "now"} and more': ('{"name": "now"} and more', []),
    "<|python": ("<|python", []),
    "   ": ("   ", []),
}


@pytest.mark.parametrize("text", LLAMA)
def test_llama3_json_calls_streamed_in_any_pieces_equal_read_whole(text):
    want_content, want_calls = LLAMA[text]
    content, calls = Llama3JsonCalls().message(text)
    assert content == want_content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls or []] == want_calls
    for content, calls, called in streamed(Llama3JsonCalls(), text, random.Random(1), 9, 10):
        assert (content or None, calls, called) == (want_content, want_calls, bool(want_calls))


def test_llama3_json_content_streams_as_it_comes():
    stream = Llama3JsonCalls().stream()
    assert stream.delta(0, "  ", False) == ({}, False)  # undecided yet
    assert stream.delta(0, "Hi", False) == ({"content": "  Hi"}, False)
    assert stream.delta(0, " there", True) == ({"content": " there"}, False)
    calls = Llama3JsonCalls(parallel=False).message('{"name": "a"}; {"name": "b"}')[1]
    assert [c["function"]["name"] for c in calls] == ["a"]
