"""The raw bytes of a token: its share of the UTF-8 output, even when that is part of a character.

Decoding a token alone shows a character split over several tokens (CJK, emoji, accents) as
U+FFFD; its bytes are what lets logprobs line up with the text (OpenAI's `bytes`, completions'
`text_offset`).
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

# GPT-2 style byte-level BPE spells each byte as a printable character; this inverts that alphabet
_BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}
# byte fallback (SentencePiece style) spells a byte no piece covers as a token "<0xNN>"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SENTENCEPIECE_STEPS = frozenset({"Replace", "ByteFallback", "Metaspace", "Fuse", "Strip"})

_per_tokenizer: weakref.WeakKeyDictionary[Any, _TokenBytes] = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: Any, token_id: int, skip_special_tokens: bool = False) -> bytes:
    """The raw bytes token `token_id` adds to decoded text (b"" for an id the tokenizer lacks).

    A special token gives its text's UTF-8, or nothing with `skip_special_tokens` (as decoding
    it gives no text then). `tokenizer` is a transformers fast tokenizer; what it needs is
    worked out once per tokenizer.
    """
    table = _per_tokenizer.get(tokenizer)
    if table is None:
        table = _per_tokenizer[tokenizer] = _TokenBytes(tokenizer)
    return table.of(token_id, skip_special_tokens)


class _TokenBytes:
    """One tokenizer's token bytes, computed once per token id."""

    def __init__(self, tokenizer: Any) -> None:
        # the backend only: a value holding the tokenizer would keep its weak key alive
        backend = tokenizer.backend_tokenizer
        self._id_to_token = backend.id_to_token
        self._decode = backend.decode
        self._special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._spelling = _scheme(backend.decoder)
        self._cache: dict[int, bytes] = {}

    def of(self, token_id: int, skip_special_tokens: bool) -> bytes:
        if skip_special_tokens and token_id in self._special:
            return b""
        data = self._cache.get(token_id)
        if data is None:
            data = self._cache[token_id] = self._bytes(token_id)
        return data

    def _bytes(self, token_id: int) -> bytes:
        token = self._id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self._special:
            return token.encode()
        if self._spelling is None:  # an unknown scheme: the token decoded alone is the best guess
            return self._decode([token_id], skip_special_tokens=False).encode()
        return self._spelling(token)


def _scheme(decoder: Any) -> Callable[[str], bytes] | None:
    """How a vocabulary token's string spells its bytes, read off the backend's decoder (which
    undoes that spelling); None for a decoder of another kind."""
    if decoder is None:
        return None
    # the decoder's own JSON (its pickled state): the whole tokenizer's holds the vocabulary
    steps = list(_flatten(json.loads(decoder.__getstate__())))
    kinds = {step["type"] for step in steps}
    if kinds == {"ByteLevel"}:
        return _byte_level
    if kinds <= _SENTENCEPIECE_STEPS:
        replacements = [_replacement(step) for step in steps]
        replacements = [r for r in replacements if r is not None]
        byte_fallback = "ByteFallback" in kinds
        if replacements or byte_fallback:
            return lambda token: _sentencepiece(token, replacements, byte_fallback)
    return None


def _flatten(decoder: dict) -> Iterator[dict]:
    if decoder["type"] == "Sequence":
        for step in decoder["decoders"]:
            yield from _flatten(step)
    else:
        yield decoder


def _replacement(step: dict) -> tuple[str, str] | None:
    """(what, by what) a step replaces in each token: '▁' by a space, in SentencePiece."""
    if step["type"] == "Metaspace":
        return step["replacement"], " "
    if step["type"] == "Replace" and "String" in step["pattern"]:
        return step["pattern"]["String"], step["content"]
    return None


def _byte_level(token: str) -> bytes:
    try:
        return bytes(_BYTE_LEVEL[char] for char in token)
    except KeyError:  # as the ByteLevel decoder does, a token outside the alphabet is its text
        return token.encode()


def _sentencepiece(token: str, replacements: list[tuple[str, str]], byte_fallback: bool) -> bytes:
    if byte_fallback and (byte := _BYTE_TOKEN.fullmatch(token)):
        return bytes([int(byte[1], 16)])
    for old, new in replacements:
        token = token.replace(old, new)
    return token.encode()
