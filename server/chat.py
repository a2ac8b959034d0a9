"""Chat messages: validated, then turned into a prompt string by the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError

ROLES = ("system", "user", "assistant")


def parse_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI messages as {role, content} dicts with text content; ValueError names the fault."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty array")
    return [_message(m, i) for i, m in enumerate(messages)]


def _message(message: Any, i: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{i}] must be an object")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, not {role!r}")
    if isinstance(content, list):
        content = "\n".join(_text_part(p, i) for p in content)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or an array of text parts")
    return {"role": role, "content": content}


def _text_part(part: Any, i: int) -> str:
    text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
    if not isinstance(text, str):
        raise ValueError(f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}")
    return text


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt text for `messages`; ValueError when the template refuses them or is missing."""
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except (TemplateError, ValueError) as exc:
        raise ValueError(f"cannot apply the chat template: {exc}") from exc
