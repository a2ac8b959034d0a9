"""Function calling, as OpenAI's chat API and vLLM have it. `tools` reach the chat template.
`tool_choice` naming a function, or "required", constrains the output to JSON with the
function's parameters (structured outputs), which the response then carries as `tool_calls`.
"auto" (OpenAI's default once tools are given) lets the model choose, and needs a parser of
the model's own call format (`kiln run --enable-auto-tool-choice --tool-call-parser NAME`):
`hermes` reads the `<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks that Qwen
and Hermes models write, `llama3_json` the `{"name": ..., "parameters": ...}` objects that
Llama 3.1 and later answer with. Without one, "auto" is a 400, as it is in vLLM.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from runtime.sampling_params import StructuredOutputs

NO_PARAMETERS = {"type": "object", "properties": {}}


class ToolsError(ValueError):
    """A bad `tools` or `tool_choice`; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def finish_reason(reason: str | None, called: bool, forced_name: str | None) -> str | None:
    """As OpenAI: "tool_calls" when the model ended on its calls; a forced named call "stop"s."""
    return "tool_calls" if reason == "stop" and called and forced_name is None else reason


@dataclass(frozen=True, slots=True)
class ForcedCalls:
    """tool_choice naming a function (`name`), or "required": one or more calls to any tool."""

    name: str | None  # None: "required"
    schema: Mapping[str, Any]  # what the output must be: the arguments, or a list of calls

    def spec(self) -> StructuredOutputs:
        """The structured outputs that make the output the call(s)' JSON."""
        return StructuredOutputs(json=dict(self.schema))

    def message(self, text: str) -> tuple[str | None, list[dict] | None]:
        """The output as (content, tool calls): the calls, or the text when it is not a whole
        list of calls ("required" cut short by max_tokens)."""
        if self.name is not None:  # the arguments as generated, even when cut short
            return None, [tool_call(self.name, text)]
        try:
            found = json.loads(text)
        except ValueError:
            return text, None
        return None, [tool_call(c["name"], _json(c["parameters"])) for c in found]

    def finish_reason(self, reason: str | None, called: bool) -> str | None:
        return finish_reason(reason, called, self.name)

    def stream(self) -> ForcedStream:
        return ForcedStream(self)


class ForcedStream:
    """A streamed response's forced calls, as chat chunk deltas: a named call's arguments as
    they come (its id and name first); "required" calls whole, once the list is complete."""

    def __init__(self, choice: ForcedCalls) -> None:
        self.choice = choice
        self.started: set[int] = set()  # choices whose named call has begun
        self.texts: dict[int, str] = {}  # "required": each choice's output so far

    def delta(self, index: int, text: str, finished: bool) -> tuple[dict[str, Any], bool]:
        """The delta of choice `index` for its new `text`, and whether it has made calls."""
        if self.choice.name is not None:
            if index in self.started:
                arguments = {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}
                return (arguments if text else {}), True
            self.started.add(index)
            return {"tool_calls": [{"index": 0} | tool_call(self.choice.name, text)]}, True
        self.texts[index] = self.texts.get(index, "") + text
        if not finished:
            return {}, False
        content, calls = self.choice.message(self.texts[index])
        if calls is None:
            return {"content": content}, False
        return {"tool_calls": [{"index": i} | c for i, c in enumerate(calls)]}, True


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
    return (call["name"], _json(arguments)) if isinstance(arguments, dict) else None


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of `text` that `marker` starts with (short of all of it)."""
    return next((k for k in range(len(marker) - 1, 0, -1) if text.endswith(marker[:k])), 0)


ToolChoice = ForcedCalls | HermesCalls | Llama3JsonCalls


def parse_tools(
    body: Mapping[str, Any], parser: str | None = None
) -> tuple[list[dict] | None, ToolChoice | None]:
    """The tools for the chat template, and how the output makes calls (None: it does not);
    `parser`: the server's tool-call parser for "auto", if any. ToolsError for a bad field."""
    for legacy in ("functions", "function_call"):  # OpenAI's older names, which vLLM ignores
        if body.get(legacy) is not None:
            raise ToolsError(f"'{legacy}' is not supported: use 'tools' and 'tool_choice'", legacy)
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice not in (None, "none"):
            raise ToolsError("'tool_choice' needs 'tools'", "tool_choice")
        return None, None
    if not isinstance(tools, list) or not tools:
        raise ToolsError("'tools' must be a non-empty array", "tools")
    functions = {}
    for i, tool in enumerate(tools):
        name, parameters = _function(tool, i)
        if name in functions:
            raise ToolsError(f"tools[{i}]: a second function named {name!r}", "tools")
        functions[name] = parameters
    parallel = body.get("parallel_tool_calls")
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise ToolsError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice is None or choice == "auto":
        if parser is None:
            raise ToolsError(
                "tool_choice 'auto' (the default with 'tools') needs the server started with "
                "--enable-auto-tool-choice --tool-call-parser; set tool_choice to 'required', "
                "'none' or a function",
                "tool_choice",
            )
        return tools, TOOL_CALL_PARSERS[parser](parallel)
    if choice == "none":
        return tools, None
    if choice == "required":
        return tools, ForcedCalls(None, _calls_schema(functions, parallel))
    named = choice.get("function") if isinstance(choice, dict) else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or name is None:
        raise ToolsError(
            "'tool_choice' must be 'none', 'auto', 'required' or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if name not in functions:
        raise ToolsError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return tools, ForcedCalls(name, functions[name])


def _calls_schema(functions: Mapping[str, Mapping[str, Any]], parallel: bool) -> dict:
    """A list of one or more {"name", "parameters"} calls (one at most unless `parallel`).
    The tools' `$defs` (and `definitions`) move to the top, where their `$ref`s point."""
    defs: dict[str, dict[str, Any]] = {}
    calls = []
    for name, parameters in functions.items():
        _check_refs(parameters, name)
        parameters = dict(parameters)
        for key in ("$defs", "definitions"):
            for def_name, schema in (parameters.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(def_name, schema) != schema:
                    raise ToolsError(
                        f"two tools define {key} {def_name!r} differently; "
                        "tool_choice 'required' needs them to agree",
                        "tools",
                    )
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}} | defs
    return schema if parallel else schema | {"maxItems": 1}


def _check_refs(schema: Any, name: str) -> None:
    """A tool's `$ref`s must point into its `$defs` or `definitions`: in the list of calls
    its schema no longer stands at the root."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and not ref.startswith(("#/$defs/", "#/definitions/")):
            raise ToolsError(
                f"function {name!r}: tool_choice 'required' takes $refs into $defs or "
                f"definitions only, not {ref!r}",
                "tools",
            )
        values = schema.values()
    elif isinstance(schema, list):
        values = schema
    else:
        return
    for value in values:
        _check_refs(value, name)


def _function(tool: Any, i: int) -> tuple[str, Mapping[str, Any]]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(function, dict)
    ):
        raise ToolsError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
    name, parameters = function.get("name"), function.get("parameters")
    if parameters is None or parameters == {}:  # a function of no arguments: {} it takes
        parameters = NO_PARAMETERS
    if not isinstance(name, str) or not name:
        raise ToolsError(f"tools[{i}].function.name must be a non-empty string", "tools")
    if not isinstance(parameters, dict):
        raise ToolsError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    return name, parameters
