"""Pure functions building OpenAI response bodies, stream chunks and error bodies."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.outputs import CompletionOutput, RequestOutput
from server.logprobs import (
    TextOffsets,
    chat_logprobs,
    completion_logprobs,
    concat,
    echo_logprobs,
    shown_token,
    token_logprobs,
)
from server.protocol import GenerateRequest
from server.reasoning import ReasoningParser
from server.tools import ToolChoice

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Meta:
    """Fields every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool


@dataclass(frozen=True, slots=True)
class Piece:
    """What one engine delta adds to one choice; logprobs already in the response's format."""

    index: int
    text: str
    logprobs: dict[str, list] | None
    finish_reason: str | None
    token_ids: tuple[int, ...] | None = None  # the delta's tokens, when the request asks
    prompt_token_ids: tuple[int, ...] | None = None  # a completion choice's first piece's
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it


def error_body(status: int, message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def token_usage(
    prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None
) -> dict:
    """OpenAI's usage; `cached_tokens` (prompt tokens served from the prefix cache), when
    given, as `prompt_tokens_details.cached_tokens`."""
    total = prompt_tokens + completion_tokens
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def model_card(name: str, max_model_len: int, created: int) -> dict:
    """The served model, as /v1/models lists it and /v1/models/{model} shows it."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "kiln",
        "root": name,
        "max_model_len": max_model_len,
    }


def model_list(name: str, max_model_len: int, created: int) -> dict:
    return {"object": "list", "data": [model_card(name, max_model_len, created)]}


def sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def join(index: int, pieces: Sequence[Piece]) -> Piece:
    """All the pieces of one choice, in order, as one."""
    merged = concat([p.logprobs for p in pieces])
    last = next((p for p in reversed(pieces) if p.finish_reason), None)
    finish, why = (last.finish_reason, last.stop_reason) if last else (None, None)
    ids = [p.token_ids for p in pieces if p.token_ids is not None]
    token_ids = tuple(t for d in ids for t in d) if ids else None
    prompt_ids = pieces[0].prompt_token_ids if pieces else None
    text = "".join(p.text for p in pieces)
    return Piece(index, text, merged, finish, token_ids, prompt_ids, why)


def choice(
    meta: Meta,
    piece: Piece,
    tool_choice: ToolChoice | None = None,
    reasoning: ReasoningParser | None = None,
) -> dict:
    """A choice of a full (not streamed) response; a chat output's thinking (`reasoning`) is
    its `reasoning_content`, and the calls the rest makes (`tool_choice`) its tool calls."""
    finish = piece.finish_reason
    if not meta.chat:
        text = {"text": piece.text}
    else:
        thought, content = reasoning.split(piece.text) if reasoning else (None, piece.text)
        message = {"role": "assistant"} | ({"reasoning_content": thought} if reasoning else {})
        if tool_choice is not None:
            content, calls = tool_choice.message(content or "")
            message |= {"tool_calls": calls} if calls else {}
            finish = tool_choice.finish_reason(finish, bool(calls))
        text = {"message": {"role": "assistant", "content": content} | message}
    out = {"index": piece.index} | text | {"logprobs": piece.logprobs, "finish_reason": finish}
    return out | {"stop_reason": piece.stop_reason} | token_ids(piece)


def token_ids(piece: Piece) -> dict[str, list[int]]:
    """vLLM's `return_token_ids` fields of a choice (a chat response has the prompt's ids at
    its top level instead)."""
    out = {}
    if piece.prompt_token_ids is not None:
        out["prompt_token_ids"] = list(piece.prompt_token_ids)
    if piece.token_ids is not None:
        out["token_ids"] = list(piece.token_ids)
    return out


def body(
    meta: Meta, choices: list[dict], usage: dict, prompt_ids: Sequence[int] | None = None
) -> dict:
    """A whole response; `prompt_ids`: a chat prompt's token ids, when the request asks."""
    kind = "chat.completion" if meta.chat else "text_completion"
    out = _head(meta, kind) | _prompt_ids(prompt_ids)
    return out | {"choices": choices, "usage": usage}


def chunk(
    meta: Meta,
    piece: Piece,
    include_usage: bool,
    role: bool = False,
    delta: dict | None = None,
    prompt_ids: Sequence[int] | None = None,
    usage: dict | None = None,
) -> dict:
    """A stream chunk for one piece; `role` marks a chat choice's first chunk (which carries
    the prompt's `prompt_ids` when the request asks); `delta`, when given, is a chat chunk's
    instead of the piece's text (tool calls: server/tools.py); `usage`: the usage so far, when
    the request asks for it in every chunk."""
    if meta.chat:
        if delta is None:
            delta = {"content": piece.text} if piece.text or role else {}
        delta = {"role": "assistant"} | delta if role else delta
        one = {"index": piece.index, "delta": delta}
        one |= {"logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
        if piece.finish_reason is not None:  # as vLLM's chat chunks: with the finish only
            one["stop_reason"] = piece.stop_reason
        one |= token_ids(piece)
    else:
        one = choice(meta, piece)
    return _chunk(meta, [one], usage, include_usage, prompt_ids)


def usage_chunk(meta: Meta, usage: dict) -> dict:
    return _chunk(meta, [], usage, True)


def _chunk(
    meta: Meta,
    choices: list[dict],
    usage: dict | None,
    include_usage: bool,
    prompt_ids: Sequence[int] | None = None,
) -> dict:
    kind = "chat.completion.chunk" if meta.chat else "text_completion"
    out = _head(meta, kind) | _prompt_ids(prompt_ids) | {"choices": choices}
    return out | {"usage": usage} if include_usage else out


def _prompt_ids(ids: Sequence[int] | None) -> dict[str, list[int]]:
    return {} if ids is None else {"prompt_token_ids": list(ids)}


def _head(meta: Meta, kind: str) -> dict[str, Any]:
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model}


class Pieces:
    """Turns engine deltas into per-choice pieces: echo (and the prompt's logprobs) once,
    running text offsets, usage."""

    def __init__(
        self,
        req: GenerateRequest,
        token_text: Callable[[int], str],
        token_bytes: Callable[[int, bool], bytes],
        cached_tokens: bool = False,
    ) -> None:
        """`token_bytes(token, skip_special_tokens)`: a token's raw bytes (see TextOffsets);
        `cached_tokens`: the usage tells how many prompt tokens the prefix cache served (vLLM's
        --enable-prompt-tokens-details)."""
        self.req = req
        self.token_text = token_text
        self.token_bytes = token_bytes
        self.cached_tokens = cached_tokens
        self.cached: dict[int, int] = {}  # prompt -> its tokens served from the prefix cache
        self.offsets: dict[int, TextOffsets] = {}  # choice -> where its tokens start
        self.scored: dict[int, list] = {}  # prompt -> its prompt logprobs, once they come
        self.echoed: dict[int, dict[str, list]] = {}  # prompt -> them in the response format
        self.completion_tokens = 0

    def of(self, prompt_index: int, out: RequestOutput) -> list[Piece]:
        if out.prompt_logprobs is not None:  # they come before any choice's first token
            self.scored[prompt_index] = out.prompt_logprobs
        self.cached[prompt_index] = out.num_cached_tokens
        return [self._piece(prompt_index * self.req.n + c.index, c) for c in out.outputs]

    def _piece(self, index: int, c: CompletionOutput) -> Piece:
        req = self.req
        if req.echo_only:  # the token generated only to run the request is not shown
            done = c.finish_reason in ("stop", "length")
            c = CompletionOutput(c.index, finish_reason="length" if done else c.finish_reason)
        self.completion_tokens += len(c.token_ids)
        echo, echoed, first = "", None, index not in self.offsets
        if first:
            echo = (req.prompts[index // req.n].text or "") if req.echo else ""
            self.offsets[index] = TextOffsets(len(echo))
            if req.echo and req.top_logprobs is not None and index // req.n in self.scored:
                echoed = self._echo_logprobs(index // req.n, echo)
        logprobs = None
        if req.top_logprobs is not None and c.logprobs is not None:
            entries = token_logprobs(
                c.token_ids,
                c.logprobs,
                req.top_logprobs,
                self.token_text,
                self._raw_bytes,
                req.tokens_as_ids,
            )
            if req.chat:
                logprobs = chat_logprobs(entries)
            else:
                logprobs = completion_logprobs(entries, self._text_offsets(index, c))
        ids = prompt_ids = None
        if req.return_token_ids:
            ids = tuple(c.token_ids)
            if first and not req.chat:  # a chat response has them once, at its top level
                prompt_ids = req.prompts[index // req.n].token_ids
        text, merged = echo + c.text, concat([echoed, logprobs])
        return Piece(index, text, merged, c.finish_reason, ids, prompt_ids, c.stop_reason)

    def _echo_logprobs(self, prompt_index: int, text: str) -> dict[str, list]:
        """The prompt's tokens with their logprobs, at their offsets in its echoed text (a
        special token the tokenizer added, absent from a text prompt, counts as its text);
        built once for the prompt's n choices."""
        if prompt_index not in self.echoed:
            ids = self.req.prompts[prompt_index].token_ids
            scored = self.scored[prompt_index]
            entries = token_logprobs(
                ids[1:],
                scored[1:],
                self.req.top_logprobs,
                self.token_text,
                self._raw_bytes,
                self.req.tokens_as_ids,
            )
            data = [self._raw_bytes(t) for t in ids]
            offsets = TextOffsets(0).delta(text, data, finished=True)
            first = f"token_id:{ids[0]}" if self.req.tokens_as_ids else self.token_text(ids[0])
            self.echoed[prompt_index] = echo_logprobs(first, entries, offsets)
        return self.echoed[prompt_index]

    def prompt_logprobs(self, prompt_index: int) -> list[dict | None] | None:
        """vLLM's `prompt_logprobs` of a prompt: for each of its tokens (None for the first,
        which nothing scores) the token's and the top k's {id: {logprob, rank, decoded_token}}."""
        scored = self.scored.get(prompt_index)
        if scored is None:
            return None
        req = self.req
        ids, k = req.prompts[prompt_index].token_ids, req.prompt_logprobs
        shown: list[dict | None] = [None]
        for token, dist in zip(ids[1:], scored[1:], strict=True):
            shown.append(
                {
                    str(t): {
                        "logprob": max(lp.logprob, -9999.0),  # JSON has no -inf; vLLM's floor
                        "rank": lp.rank,
                        "decoded_token": shown_token(t, lp, self.token_text, req.tokens_as_ids),
                    }
                    for t, lp in dist.items()
                    if t == token or lp.rank <= k
                }
            )
        return shown

    def _raw_bytes(self, token: int) -> bytes:
        return self.token_bytes(token, False)

    def _text_offsets(self, index: int, c: CompletionOutput) -> list[int]:
        """Where the delta's tokens start in the choice text (a skipped special token adds none)."""
        skip = self.req.prompts[index // self.req.n].params.skip_special_tokens
        data = [self.token_bytes(t, skip) for t in c.token_ids]
        return self.offsets[index].delta(c.text, data, c.finished)

    def usage(self) -> dict:
        """The usage so far; cached tokens (when asked) summed over the prompts, each counted
        once however many choices it has, as its prompt tokens are."""
        prompt_tokens = sum(len(p.token_ids) for p in self.req.prompts)
        cached = sum(self.cached.values()) if self.cached_tokens else None
        return token_usage(prompt_tokens, self.completion_tokens, cached)
