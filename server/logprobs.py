"""Logprobs in the response formats: the completions' (with text offsets) and the chat's
(with raw bytes), from the engine's per-token Logprob dicts."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from runtime.outputs import Logprob


@dataclass(frozen=True, slots=True)
class Candidate:
    """A token's text (decoded alone), raw bytes (maybe part of a character) and logprob."""

    token: str
    bytes: bytes
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A sampled token and the most likely alternatives, best first."""

    sampled: Candidate
    top: tuple[Candidate, ...]


def token_logprobs(
    token_ids: Sequence[int],
    logprobs: Sequence[dict[int, Logprob]],
    top_n: int,
    token_text: Callable[[int], str],
    token_bytes: Callable[[int], bytes],
    as_ids: bool = False,
) -> list[TokenLogprob]:
    """Engine logprobs (one dict per sampled token) as TokenLogprobs with `top_n` alternatives;
    `as_ids`: each token's text is "token_id:N"."""

    def candidate(token: int, lp: Logprob) -> Candidate:
        return Candidate(shown_token(token, lp, token_text, as_ids), token_bytes(token), lp.logprob)

    out = []
    for token, dist in zip(token_ids, logprobs, strict=True):
        ranked = sorted(dist.items(), key=lambda item: item[1].rank)
        top = tuple(candidate(t, lp) for t, lp in ranked if lp.rank <= top_n)
        out.append(TokenLogprob(candidate(token, dist[token]), top))
    return out


def shown_token(
    token: int, lp: Logprob, token_text: Callable[[int], str], as_ids: bool = False
) -> str:
    """A logprob's token as the response shows it: its text decoded alone, or "token_id:N"."""
    if as_ids:
        return f"token_id:{token}"
    return lp.decoded_token if lp.decoded_token is not None else token_text(token)


def completion_logprobs(entries: Sequence[TokenLogprob], offsets: list[int]) -> dict[str, list]:
    """The completions format; `offsets` are where the tokens start in the choice text."""
    return {
        "tokens": [e.sampled.token for e in entries],
        "token_logprobs": [e.sampled.logprob for e in entries],
        # the sampled token is always listed, as in vLLM, even when it is not among the top
        "top_logprobs": [{c.token: c.logprob for c in (*e.top, e.sampled)} for e in entries],
        "text_offset": offsets,
    }


def _chat_token(c: Candidate) -> dict:
    return {"token": c.token, "logprob": c.logprob, "bytes": list(c.bytes)}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict[str, list]:
    """The chat format: `bytes` are raw, so those of the tokens of one character join to it."""
    content = [
        _chat_token(e.sampled) | {"top_logprobs": [_chat_token(c) for c in e.top]} for e in entries
    ]
    return {"content": content}


class TextOffsets:
    """Where each token of one choice starts in its text, in characters.

    It walks the tokens' raw bytes and counts the characters of their UTF-8 decoding (an
    invalid byte sequence counts as the U+FFFD the detokenizer shows for it), so a token that
    starts inside a character, as the second token of a CJK character split over two does,
    gets that character's offset.
    """

    def __init__(self, start: int) -> None:
        self._text_length = start  # of the choice text so far
        self._chars = start  # where the bytes decoded so far end in the text
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def delta(self, text: str, data: Sequence[bytes], finished: bool) -> list[int]:
        """Where the tokens of a delta adding `text` start, from their raw bytes `data`. Once the
        choice is finished, a token past its text (cut off with a stop string) is at its end."""
        self._text_length += len(text)
        offsets = [self._add(d) for d in data]
        return [min(o, self._text_length) for o in offsets] if finished else offsets

    def _add(self, data: bytes) -> int:
        """The offset of the next token, whose raw bytes are `data`."""
        pending = self._utf8.getstate()[0]  # the start of a character still unfinished
        offset = self._chars
        if data:
            # the token's first byte continues that character (one character: its offset) or,
            # invalid there, follows it (which becomes a U+FFFD before it: two)
            offset += len((pending + data[:1]).decode("utf-8", "replace")) - 1
        self._chars += len(self._utf8.decode(data))
        return offset


def echo_logprobs(
    first: str, entries: Sequence[TokenLogprob], offsets: list[int]
) -> dict[str, list]:
    """The completions format of a prompt's logprobs: its first token, `first`, which nothing
    scores, with a null logprob and top, then the other tokens; `offsets`: all of theirs."""
    rest = completion_logprobs(entries, offsets[1:])
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": offsets,
    }


def concat(logprobs: Sequence[dict[str, list] | None]) -> dict[str, list] | None:
    """Completion-format logprobs one after another, as one (None: none of them)."""
    given = [lp for lp in logprobs if lp is not None]
    return {k: [x for lp in given for x in lp[k]] for k in given[0]} if given else None
