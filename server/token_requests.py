"""The /tokenize and /detokenize requests, parsed as vLLM reads them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from server.fields import bad, field, warns_ignored
from server.protocol import ModelInfo, chat_prompt, check_model, check_token_ids, encode


@dataclass(frozen=True, slots=True)
class TokenizeRequest:
    """A /tokenize request: the prompt's token ids, and whether their strings are shown too."""

    token_ids: list[int]
    token_strs: bool = False  # vLLM's `return_token_strs`


@warns_ignored
def parse_tokenize(body: Mapping[str, Any], info: ModelInfo) -> TokenizeRequest:
    check_model(body, info)
    token_strs = field(body, "return_token_strs", bool, False)
    if "messages" in body:  # the prompt its chat request would have, tools shown
        tools = body.get("tools")
        ids = chat_prompt(body, info, False, tools if isinstance(tools, list) else None)
        return TokenizeRequest(ids, token_strs)
    prompt = field(body, "prompt", str)
    if prompt is None:
        raise bad("'prompt' or 'messages' is required", "prompt")
    special = field(body, "add_special_tokens", bool, True)
    return TokenizeRequest(encode(info, prompt, special, "prompt"), token_strs)


@warns_ignored
def parse_detokenize(body: Mapping[str, Any], info: ModelInfo) -> list[int]:
    check_model(body, info)
    if info.tokenizer is None:
        raise bad("this model has no tokenizer", "tokens")
    return check_token_ids(body.get("tokens"), info, "tokens")
