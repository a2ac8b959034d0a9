"""Tool calls read out of a model's own output, for tool_choice "auto" (`kiln run
--enable-auto-tool-choice --tool-call-parser NAME`): `hermes` reads the `<tool_call>{"name":
..., "arguments": ...}</tool_call>` blocks that Qwen and Hermes models write, `llama3_json`
the `{"name": ..., "parameters": ...}` objects that Llama 3.1 and later answer with. Each
reads a whole output, or streams it: a stream gives the same content and calls.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def finish_reason(reason: str | None, called: bool, forced_name: str | None) -> str | None:
    """As OpenAI: "tool_calls" when the model ended on its calls; a forced named call "stop"s."""
    return "tool_calls" if reason == "stop" and called and forced_name is None else reason


class Scan(NamedTuple):
    """What `HermesCalls.scan` settled: more text cannot change it."""

    content: str  # text outside the blocks
    calls: list[tuple[str, str]]  # (name, arguments as JSON)
    end: int  # where the settled text ends; a stream scans on from here
    kept: bool  # the text from `end` on continues content already settled (keep it whole)


@dataclass(frozen=True, slots=True)
class HermesCalls:
    """tool_choice "auto" with the hermes parser: the model's `<tool_call>` blocks are its
    calls; the text outside them its content (a block that is no call stays text)."""

    parallel: bool = True  # False: only the first call is made, as vLLM keeps it

    START: ClassVar[str] = "<tool_call>"
    END: ClassVar[str] = "</tool_call>"

    def message(self, text: str) -> tuple[str | None, list[dict] | None]:
        found = self.scan(text, final=True)
        calls = found.calls if self.parallel else found.calls[:1]
        return found.content or None, [tool_call(*c) for c in calls] or None

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return finish_reason(reason, called, None)

    def stream(self) -> HermesStream:
        return HermesStream(self)

    def scan(self, text: str, final: bool, called: bool = False, kept: bool = False) -> Scan:
        """The content and calls of `text` (`called`: a call came before it; `kept`: its
        start continues settled content). Unless `final`, only what more text cannot change:
        a call once its block ends, content up to where a block might be starting, and no
        whitespace after a call until more than whitespace follows. Scanning a text whole,
        or in pieces each from the last one's end, finds the same content and calls."""
        content, calls, pos = [], [], 0
        while (start := text.find(self.START, pos)) >= 0:
            content.append(_between(text[pos:start], called or bool(calls), kept))
            close = text.find(self.END, start)
            if close >= 0:
                block, stop = text[start + len(self.START) : close], close + len(self.END)
            elif final:  # cut short by max_tokens: a call if what came is one
                block, stop = text[start + len(self.START) :], len(text)
            else:  # a block still open: scanned again once more text comes
                return Scan("".join(content), calls, start, False)
            call = _hermes_call(block)
            if call is None:  # not a call: the model's text, as it wrote it
                content.append(text[start:stop])
            else:
                calls.append(call)
            pos, kept = stop, False
        rest = text[pos:]
        if not final:  # what may start a block waits
            rest = rest[: len(rest) - _partial_suffix(rest, self.START)]
        shown = _between(rest, called or bool(calls), kept)
        if not (shown or final):  # whitespace after a call: a separator, or content to come
            return Scan("".join(content), calls, pos, kept)
        content.append(shown)
        return Scan("".join(content), calls, pos + len(rest), kept or bool(shown))


@dataclass(slots=True)
class _Progress:
    """One choice's stream: the text not settled yet, and what came before it."""

    text: str = ""
    calls: int = 0  # calls found
    kept: bool = False  # see Scan.kept


class HermesStream:
    """A streamed response's content and calls, each sent as soon as more text cannot change
    it; each delta scans only the text not settled before."""

    def __init__(self, choice: HermesCalls) -> None:
        self.choice = choice
        self.progress: dict[int, _Progress] = {}

    def delta(self, index: int, text: str, finished: bool) -> tuple[dict[str, Any], bool]:
        """The delta of choice `index` for its new `text`, and whether it has made calls."""
        p = self.progress.setdefault(index, _Progress())
        found = self.choice.scan(p.text + text, finished, p.calls > 0, p.kept)
        delta: dict[str, Any] = {"content": found.content} if found.content else {}
        new = found.calls if self.choice.parallel else found.calls[: max(0, 1 - p.calls)]
        if new:
            delta["tool_calls"] = [
                {"index": p.calls + i} | tool_call(*c) for i, c in enumerate(new)
            ]
        p.text, p.calls, p.kept = (
            (p.text + text)[found.end :],
            p.calls + len(found.calls),
            found.kept,
        )
        return delta, p.calls > 0


def _between(text: str, called: bool, kept: bool) -> str:
    """Text outside the blocks; after a call, whitespace alone is only a separator (unless it
    continues content)."""
    return text if kept or not called or text.strip() else ""


@dataclass(frozen=True, slots=True)
class Llama3JsonCalls:
    """tool_choice "auto" with the llama3_json parser: an output that is JSON calls,
    {"name": ..., "parameters": {...}} (several: separated by ";"), after an optional
    <|python_tag|>, is the model's calls; any other output is its content."""

    parallel: bool = True  # False: only the first call is made, as vLLM keeps it

    TAG: ClassVar[str] = "<|python_tag|>"

    def message(self, text: str) -> tuple[str | None, list[dict] | None]:
        found = self.calls(text)
        if found is None:
            return text or None, None
        return None, [tool_call(*c) for c in (found if self.parallel else found[:1])]

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return finish_reason(reason, called, None)

    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream(self)

    def calls(self, text: str) -> list[tuple[str, str]] | None:
        """The (name, arguments) calls the whole output is; None when it is not calls. A ";"
        may end the last one too, as vLLM reads it."""
        body = text.strip().removeprefix(self.TAG).lstrip()
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while body.startswith("{", pos):
            try:
                value, pos = decoder.raw_decode(body, pos)
            except ValueError:
                return None
            call = _named_call(value)
            if call is None:
                return None
            calls.append(call)
            rest = body[pos:].lstrip()
            if not rest.startswith(";"):
                return calls if not rest else None
            pos = len(body) - len(rest[1:].lstrip())
        return calls if calls and pos == len(body) else None

    def may_call(self, text: str) -> bool | None:
        """Whether an output starting with `text` may be calls (True) or is content (False);
        None until its first characters tell."""
        head = text.lstrip()
        if head.startswith(("{", self.TAG)):
            return True
        return None if self.TAG.startswith(head) else False


@dataclass(slots=True)
class _Whole:
    """One choice's stream under llama3_json: its text, and whether it may be calls."""

    text: str = ""
    calls: bool | None = None
    sent: int = 0  # content characters sent


class Llama3JsonStream:
    """A streamed response under llama3_json: content as it comes once the output's first
    characters show it is not calls; calls whole, at the end (the output is one JSON list)."""

    def __init__(self, choice: Llama3JsonCalls) -> None:
        self.choice = choice
        self.progress: dict[int, _Whole] = {}

    def delta(self, index: int, text: str, finished: bool) -> tuple[dict[str, Any], bool]:
        """The delta of choice `index` for its new `text`, and whether it has made calls."""
        p = self.progress.setdefault(index, _Whole())
        p.text += text
        if p.calls is None:
            p.calls = self.choice.may_call(p.text)
        if p.calls is not False and not finished:  # undecided, or calls: wait for the whole
            return {}, False
        if p.calls:
            _, calls = self.choice.message(p.text)
            if calls:
                return {"tool_calls": [{"index": i} | c for i, c in enumerate(calls)]}, True
        new, p.sent = p.text[p.sent :], len(p.text)  # content: all of it, as it comes
        return ({"content": new} if new else {}), False


TOOL_CALL_PARSERS = {"hermes": HermesCalls, "llama3_json": Llama3JsonCalls}


def _hermes_call(block: str) -> tuple[str, str] | None:
    """(name, arguments as JSON) of a block's {"name": ..., "arguments": {...}}; None if the
    block is not that."""
    try:
        return _named_call(json.loads(block))
    except ValueError:
        return None


def _named_call(call: Any) -> tuple[str, str] | None:
    """(name, arguments as JSON) of {"name": ..., "arguments": {...}} (or "parameters", as
    some models write it); None if `call` is not that."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments")
    if arguments is None:
        arguments = call.get("parameters")
    if arguments is None:
        return call["name"], "{}"
    if isinstance(arguments, str):
        return call["name"], arguments
    return (call["name"], arguments_json(arguments)) if isinstance(arguments, dict) else None


def arguments_json(value: Any) -> str:
    """A call's arguments as OpenAI gives them: a JSON string."""
    return json.dumps(value, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (short of all of it)."""
    return next((k for k in range(len(marker) - 1, 0, -1) if text.endswith(marker[:k])), 0)
