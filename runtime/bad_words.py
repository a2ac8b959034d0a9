"""vLLM's `bad_words`: words tokenized into token-id sequences the output may not contain,
and the tokens those sequences ban at a sequence's next step."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from runtime.sampling_params import SamplingParams


class BadWords:
    """A sequence's bad words: each one-token word's token is banned at every step; a longer
    word's last token where the output ends with the rest of it."""

    def __init__(self, sequences: tuple[tuple[int, ...], ...]) -> None:
        self.tokens: list[int] = []  # the one-token words'
        # the longer words, by the last token of their prefix: [(prefix, token banned after)]
        self.after: dict[int, list[tuple[list[int], int]]] = {}
        for *prefix, token in dict.fromkeys(sequences):
            if prefix:
                self.after.setdefault(prefix[-1], []).append((prefix, token))
            else:
                self.tokens.append(token)

    def banned(self, output: list[int]) -> list[int]:
        """The tokens banned after `output` (only the output: as in vLLM, a word is not
        matched across the prompt's end)."""
        after = self.after.get(output[-1], ()) if output else ()
        if not after:
            return self.tokens
        n = len(output)
        return self.tokens + [t for prefix, t in after if output[n - len(prefix) :] == prefix]


def bad_word_token_ids(word: str, tokenizer: Any) -> list[tuple[int, ...]]:
    """The token-id sequences that ban `word`, as vLLM makes them: the word (leading spaces
    stripped) encoded without special tokens; and the word after a space (as it comes
    mid-text, where a tokenizer folds the space into the first token), kept only when that
    makes another first token and the same number of tokens."""
    alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
    if not alone:
        raise ValueError(f"invalid bad_words: {word!r} encodes to no token")
    spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
    if spaced and spaced[0] != alone[0] and len(spaced) == len(alone):
        return [alone, spaced]
    return [alone]


def resolve_bad_words(params: SamplingParams, tokenizer: Any) -> SamplingParams:
    """`params` with its bad_words' token-id sequences added to bad_words_token_ids (each
    sequence once, so resolving again changes nothing); ValueError without a tokenizer."""
    if not params.bad_words:
        return params
    if tokenizer is None:
        raise ValueError("bad_words need a tokenizer, and this model has none")
    resolved = [ids for word in params.bad_words for ids in bad_word_token_ids(word, tokenizer)]
    merged = tuple(dict.fromkeys([*params.bad_words_token_ids, *resolved]))
    return replace(params, bad_words_token_ids=merged)
