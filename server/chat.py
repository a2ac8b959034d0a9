"""Chat messages to a prompt string through the tokenizer's chat template."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    """The prompt text for `messages`; ValueError when the template refuses them or is missing."""
    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except (TemplateError, ValueError) as exc:
        raise ValueError(f"cannot apply the chat template: {exc}") from exc
