"""Reasoning parsers: a whole output's split, and a stream's, whatever its deltas."""

from __future__ import annotations

import random

import pytest

from server.reasoning import REASONING_PARSERS


@pytest.mark.parametrize(
    ("parser", "text", "reasoning", "content"),
    [
        ("qwen3", "<think>\nsteps\n</think>\n\nParis.", "\nsteps\n", "\n\nParis."),
        ("qwen3", "Paris.", None, "Paris."),  # thinking off: the template closed the block
        ("qwen3", "<think>cut short", "cut short", None),  # max_tokens inside the block
        ("qwen3", "<think></think>Paris.", None, "Paris."),
        ("qwen3", "<thi", None, "<thi"),
        ("qwen3", "a </think> b", None, "a </think> b"),  # no opening tag: all answer
        ("deepseek_r1", "steps</think>Paris.", "steps", "Paris."),
        ("deepseek_r1", "<think>steps</think>Paris.", "steps", "Paris."),
        ("deepseek_r1", "still thinking", "still thinking", None),
        ("deepseek_r1", "", None, None),
    ],
)
def test_a_whole_output_splits_into_reasoning_and_content(parser, text, reasoning, content):
    assert REASONING_PARSERS[parser].split(text) == (reasoning, content)


def _streamed(parser, deltas: list[str]) -> tuple[str, str]:
    stream = REASONING_PARSERS[parser].stream()
    reasoning = content = ""
    for delta in [*deltas, None]:
        r, c = stream.feed(delta) if delta is not None else stream.finish()
        reasoning, content = reasoning + r, content + c
    return reasoning, content


@pytest.mark.parametrize("parser", sorted(REASONING_PARSERS))
def test_a_stream_splits_as_the_whole_text_whatever_its_deltas(parser):
    rng = random.Random(0)
    words = ["<think>", "</think>", "<", "</", "</th", "think", ">", "a", "b c", "\n", "<thi"]
    for _ in range(500):
        text = "".join(rng.choice(words) for _ in range(rng.randrange(0, 8)))
        cuts = sorted(rng.sample(range(1, len(text)), min(max(len(text) - 1, 0), rng.randrange(4))))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        reasoning, content = REASONING_PARSERS[parser].split(text)
        assert _streamed(parser, deltas) == (reasoning or "", content or ""), (text, deltas)


def test_a_stream_holds_only_what_may_begin_the_closing_tag():
    stream = REASONING_PARSERS["qwen3"].stream()
    assert stream.feed("<thi") == ("", "")  # the opening tag, or an answer that begins so
    assert stream.feed("nk>plan </") == ("plan ", "")
    assert stream.feed("thin") == ("", "")
    assert stream.feed("k>Paris") == ("", "Paris")
    assert stream.feed(" </think>") == ("", " </think>")  # after the block: all content
    assert stream.finish() == ("", "")
