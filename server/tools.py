"""Function calling, as OpenAI's chat API and vLLM have it. `tools` reach the chat template.
`tool_choice` naming a function, or "required", constrains the output to JSON with the
function's parameters (structured outputs), which the response then carries as `tool_calls`.
"auto" (OpenAI's default once tools are given) lets the model choose, and needs a parser of
the model's own call format (server/tool_parsers.py). Without one, "auto" is a 400, as it is
in vLLM.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.sampling_params import StructuredOutputs
from server.tool_parsers import (
    TOOL_CALL_PARSERS,
    HermesCalls,
    Llama3JsonCalls,
    arguments_json,
    finish_reason,
    tool_call,
)

NO_PARAMETERS = {"type": "object", "properties": {}}


class ToolsError(ValueError):
    """A bad `tools` or `tool_choice`; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


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
        return None, [tool_call(c["name"], arguments_json(c["parameters"])) for c in found]

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
    parallel = body.get("parallel_tool_calls")  # read (and checked) with tools or without
    if parallel is None:
        parallel = True
    elif not isinstance(parallel, bool):
        raise ToolsError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
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
