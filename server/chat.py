"""Chat messages: validated, then turned into a prompt string by the tokenizer's chat template."""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

from jinja2 import Environment, TemplateError, meta

# "developer" is OpenAI's newer name for "system", which chat templates know it by
ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI messages as dicts for a chat template (text content; an assistant's tool calls,
    a tool's answer); ValueError names the fault."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, i: int) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
    calls = message.get("tool_calls") if role == "assistant" else None
    if content is None and calls:  # an assistant turn that only called tools
        content = ""
    if isinstance(content, list):
        content = "\n".join(_text_part(p, i) for p in content)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or an array of text parts")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if calls is not None:
        out["tool_calls"] = _tool_calls(calls, i)
    if role == "tool":  # OpenAI requires it; templates pair the answer with its call by it
        if not isinstance(message.get("tool_call_id"), str):
            raise ValueError(f"messages[{i}].tool_call_id must be the id of the call answered")
        out["tool_call_id"] = message["tool_call_id"]
    if isinstance(message.get("name"), str):  # some templates show it
        out["name"] = message["name"]
    return out


def _tool_calls(calls: Any, i: int) -> list[dict[str, Any]]:
    """An assistant's tool calls, their arguments parsed from JSON (templates print them),
    as vLLM passes them."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise ValueError(f"{where} must be an array")
    out = []
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise ValueError(f"{where}[{k}] must have a function with a name and arguments")
        with contextlib.suppress(ValueError):  # not JSON: a template prints it as it is
            arguments = json.loads(arguments)
        entry = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _text_part(part: Any, i: int) -> str:
    text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
    if not isinstance(text, str):
        raise ValueError(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}")
    return text


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool,
    tools: list[dict] | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The prompt text for `messages` (and the `tools` the model may call, for a template
    that shows them); `continue_final_message`: open at the end of the last message, for the
    model to go on with; `template_kwargs`: values for the template's own variables (Qwen3's
    `enable_thinking`, say), others dropped. ValueError when the template refuses them or is
    missing."""
    kwargs = {
        **template_values(tokenizer, template_kwargs or {}),
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "tokenize": False,
    }
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except (TemplateError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot apply the chat template: {exc}") from exc


class TemplatedTokenizer:
    """A tokenizer with another chat template (`kiln run --chat-template`): rendering uses
    it, and so does picking a request's `chat_template_kwargs`; the rest is the tokenizer's,
    which stays as it is."""

    def __init__(self, tokenizer: Any, chat_template: str) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, **kwargs
        )


# what transformers passes a template itself: a request sets none of these
RESERVED = frozenset({"messages", "tools", "documents", "add_generation_prompt",
                      "continue_final_message", "raise_exception", "strftime_now"})  # fmt: skip


def template_values(tokenizer: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The request's `chat_template_kwargs` that are variables of the model's template, as
    vLLM keeps them: never the template itself, tokenizer options or special tokens."""
    names = _variables(tokenizer.chat_template) if isinstance(tokenizer.chat_template, str) else ()
    special = set(tokenizer.special_tokens_map)
    return {k: v for k, v in values.items() if k in names and k not in RESERVED | special}


@functools.lru_cache(maxsize=8)
def _variables(template: str) -> frozenset[str]:
    try:
        return frozenset(meta.find_undeclared_variables(Environment().parse(template)))
    except TemplateError:
        return frozenset()
