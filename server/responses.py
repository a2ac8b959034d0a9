"""Pure functions building OpenAI response bodies, stream chunks and error bodies."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from runtime.outputs import CompletionOutput, Logprob, RequestOutput
from server.protocol import GenerateRequest

DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class Meta:
    """Fields every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    chat: bool


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token's text and logprob, and the most likely alternatives, best first."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True, slots=True)
class Piece:
    """What one engine delta adds to one choice; logprobs already in the response's format."""

    index: int
    text: str
    logprobs: dict[str, list] | None
    finish_reason: str | None


def error_body(status: int, message: str, type: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": status}}


def token_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
    }


def model_list(name: str, max_model_len: int, created: int) -> dict:
    model = {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "kiln",
        "root": name,
        "max_model_len": max_model_len,
    }
    return {"object": "list", "data": [model]}


def sse(data: dict) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"


def token_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob]],
    top_n: int,
    token_text: Callable[[int], str],
) -> list[TokenLogprob]:
    """Engine logprobs (one dict per sampled token) as TokenLogprobs with `top_n` alternatives."""

    def text(token: int, lp: Logprob) -> str:
        return lp.decoded_token if lp.decoded_token is not None else token_text(token)

    out = []
    for token, dist in zip(token_ids, logprobs, strict=True):
        ranked = sorted(dist.items(), key=lambda item: item[1].rank)
        top = tuple((text(t, lp), lp.logprob) for t, lp in ranked if lp.rank <= top_n)
        out.append(TokenLogprob(text(token, dist[token]), dist[token].logprob, top))
    return out


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int) -> dict[str, list]:
    """The completions format; `text_offset` is where the first token starts in the choice text."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        # the sampled token is always listed, as in vLLM, even when it is not among the top
        "top_logprobs": [dict(e.top) | {e.token: e.logprob} for e in entries],
        "text_offset": offsets,
    }


def _chat_token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, list]:
    content = [
        _chat_token(e.token, e.logprob) | {"top_logprobs": [_chat_token(*t) for t in e.top]}
        for e in entries
    ]
    return {"content": content}


def join(index: int, pieces: Sequence[Piece]) -> Piece:
    """All the pieces of one choice, in order, as one."""
    logprobs = [p.logprobs for p in pieces if p.logprobs is not None]
    merged = {k: [x for lp in logprobs for x in lp[k]] for k in logprobs[0]} if logprobs else None
    finish = next((p.finish_reason for p in reversed(pieces) if p.finish_reason), None)
    return Piece(index, "".join(p.text for p in pieces), merged, finish)


def choice(meta: Meta, piece: Piece) -> dict:
    """A choice of a full (not streamed) response."""
    text = {"message": {"role": "assistant", "content": piece.text}} if meta.chat else None
    return (
        {"index": piece.index}
        | (text or {"text": piece.text})
        | {"logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
    )


def body(meta: Meta, choices: list[dict], usage: dict) -> dict:
    kind = "chat.completion" if meta.chat else "text_completion"
    return _head(meta, kind) | {"choices": choices, "usage": usage}


def chunk(meta: Meta, piece: Piece, include_usage: bool, role: bool = False) -> dict:
    """A stream chunk for one piece; `role` marks a chat choice's first chunk."""
    if meta.chat:
        delta = {"content": piece.text} if piece.text or role else {}
        delta = {"role": "assistant"} | delta if role else delta
        one = {"index": piece.index, "delta": delta}
        one |= {"logprobs": piece.logprobs, "finish_reason": piece.finish_reason}
    else:
        one = choice(meta, piece)
    return _chunk(meta, [one], None, include_usage)


def usage_chunk(meta: Meta, usage: dict) -> dict:
    return _chunk(meta, [], usage, True)


def _chunk(meta: Meta, choices: list[dict], usage: dict | None, include_usage: bool) -> dict:
    kind = "chat.completion.chunk" if meta.chat else "text_completion"
    out = _head(meta, kind) | {"choices": choices}
    return out | {"usage": usage} if include_usage else out


def _head(meta: Meta, kind: str) -> dict[str, Any]:
    return {"id": meta.id, "object": kind, "created": meta.created, "model": meta.model}


class Pieces:
    """Turns engine deltas into per-choice pieces: echo once, running text offsets, usage."""

    def __init__(self, req: GenerateRequest, token_text: Callable[[int], str]) -> None:
        self.req = req
        self.token_text = token_text
        self.offsets: dict[int, int] = {}  # choice -> where its next token's text starts
        self.completion_tokens = 0

    def of(self, prompt_index: int, out: RequestOutput) -> list[Piece]:
        return [self._piece(prompt_index * self.req.n + c.index, c) for c in out.outputs]

    def _piece(self, index: int, c: CompletionOutput) -> Piece:
        req = self.req
        self.completion_tokens += len(c.token_ids)
        echo = ""
        if index not in self.offsets:
            echo = (req.prompts[index // req.n].text or "") if req.echo else ""
            self.offsets[index] = len(echo)
        logprobs = None
        if req.top_logprobs is not None and c.logprobs is not None:
            entries = token_logprobs(c.token_ids, c.logprobs, req.top_logprobs, self.token_text)
            offset = self.offsets[index]
            self.offsets[index] += sum(len(e.token) for e in entries)
            logprobs = chat_logprobs(entries) if req.chat else completion_logprobs(entries, offset)
        return Piece(index, echo + c.text, logprobs, c.finish_reason)

    def usage(self) -> dict:
        prompt_tokens = sum(len(p.token_ids) for p in self.req.prompts)
        return token_usage(prompt_tokens, self.completion_tokens)
