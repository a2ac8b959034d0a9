"""Function calling, as OpenAI's chat API and vLLM have it: `tools` reach the chat template;
`tool_choice` naming a function, or "required", constrains the output to JSON with the
function's parameters (structured outputs), which the response then carries as `tool_calls`.

`tool_choice: "auto"` (OpenAI's default once tools are given) needs a model-specific parser
of the output, which this server does not have; it is a 400, as it is in vLLM without one.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runtime.sampling_params import StructuredOutputs

NO_PARAMETERS = {"type": "object", "properties": {}}


class ToolsError(ValueError):
    """A bad `tools` or `tool_choice`; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """A request's forced function calls: one call to `name`, or one or more to any tool."""

    functions: Mapping[str, Mapping[str, Any]]  # name -> its JSON schema of parameters
    name: str | None  # None: "required"
    parallel: bool  # "required": more than one call allowed

    def spec(self) -> StructuredOutputs:
        """The structured outputs that make the output the call(s)' JSON."""
        if self.name is not None:
            return StructuredOutputs(json=dict(self.functions[self.name]))
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for name, parameters in self.functions.items()
        ]
        array = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        return StructuredOutputs(json=array if self.parallel else array | {"maxItems": 1})

    def calls(self, text: str) -> list[dict[str, Any]] | None:
        """The output's tool calls in OpenAI's format; None when the output is not a whole
        list of calls ("required" cut short by max_tokens)."""
        if self.name is not None:  # the arguments as generated, even when cut short
            return [tool_call(self.name, text)]
        try:
            found = json.loads(text)
        except ValueError:
            return None
        return [
            tool_call(c["name"], json.dumps(c["parameters"], ensure_ascii=False)) for c in found
        ]

    def finish_reason(self, reason: str | None, calls: list | None) -> str | None:
        """As OpenAI: "tool_calls" when "required" made its calls; a named call "stop"s."""
        return "tool_calls" if reason == "stop" and calls and self.name is None else reason


class CallStream:
    """A streamed response's tool calls, as chat chunk deltas: a named call's arguments as
    they come (its id and name first); "required" calls whole, once the list is complete."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.started: set[int] = set()  # choices whose named call has begun
        self.texts: dict[int, str] = {}  # "required": each choice's output so far

    def delta(self, index: int, text: str, finished: bool) -> tuple[dict[str, Any], list | None]:
        """The delta of choice `index` for its new `text`, and the calls it completes."""
        name = self.choice.name
        if name is not None:
            if index in self.started:
                return (
                    {"tool_calls": [{"index": 0, "function": {"arguments": text}}]} if text else {}
                ), None
            self.started.add(index)
            call = tool_call(name, text)
            return {"tool_calls": [{"index": 0} | call]}, [call]
        self.texts[index] = self.texts.get(index, "") + text
        if not finished:
            return {}, None
        calls = self.choice.calls(self.texts[index])
        if calls is None:  # cut short: the text as it is
            return {"content": self.texts[index]}, None
        return {"tool_calls": [{"index": i} | c for i, c in enumerate(calls)]}, calls


def tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


def parse_tools(body: Mapping[str, Any]) -> tuple[list[dict] | None, ToolChoice | None]:
    """The tools for the chat template, and the calls `tool_choice` forces (None: the model
    answers in text); ToolsError for a bad field."""
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
    if choice is None or choice == "auto":
        raise ToolsError(
            "tool_choice 'auto' (the default with 'tools') needs a tool-call parser, which "
            "this server does not have; set tool_choice to 'required', 'none' or a function",
            "tool_choice",
        )
    if choice == "none":
        return tools, None
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ToolsError("'parallel_tool_calls' must be a boolean", "parallel_tool_calls")
    if choice == "required":
        return tools, ToolChoice(functions, None, parallel)
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
    return tools, ToolChoice(functions, name, parallel)


def _function(tool: Any, i: int) -> tuple[str, Mapping[str, Any]]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if (
        not isinstance(tool, dict)
        or tool.get("type") != "function"
        or not isinstance(function, dict)
    ):
        raise ToolsError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
    name, parameters = function.get("name"), function.get("parameters", NO_PARAMETERS)
    if not isinstance(name, str) or not name:
        raise ToolsError(f"tools[{i}].function.name must be a non-empty string", "tools")
    if not isinstance(parameters, dict):
        raise ToolsError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
    return name, parameters
