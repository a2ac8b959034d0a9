"""Per-request sampling parameters (plain data, no torch)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# below it sampling is greedy, as in vLLM: logits / temperature would overflow float32
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**63 - 1)  # a 64-bit signed integer, as vLLM takes it


STRUCTURED_FIELDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """What the output must match (structured outputs, runtime/structured.py): exactly one
    of the fields."""

    json: str | None = None  # a JSON schema (a dict is serialized)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # one of these strings
    grammar: str | None = None  # EBNF (xgrammar's GBNF dialect)

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # in its own order: the output's properties follow it
            object.__setattr__(self, "json", json.dumps(self.json))
        for name in ("json", "regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured outputs: {name} must be a string")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured outputs: json_object must be a boolean")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, list | tuple):
                raise ValueError("structured outputs: choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured outputs: choice must be non-empty strings")
        given = [name for name in STRUCTURED_FIELDS if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"structured outputs: set exactly one of {', '.join(STRUCTURED_FIELDS)} (got "
                f"{', '.join(given) or 'none'})"
            )


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What one request asks of the sampler; validated on construction."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs to return with each sampled token (<= 20)
    # top-k logprobs to return with each prompt token after the first (<= 20); such a request
    # computes its whole prompt, as vLLM's does: no prefix-cache hits
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_token_ids: tuple[int, ...] | None = None  # the only tokens it may sample
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # leave special tokens (e.g. "<|im_end|>") out of text
    structured_outputs: StructuredOutputs | None = None  # what the output must match
    # vLLM's: words the output may not contain, each tokenized by the engine (with its
    # tokenizer, `resolve_bad_words`) into bad_words_token_ids
    bad_words: tuple[str, ...] = ()
    # token-id sequences the output may not contain: a sequence's last token is banned where
    # the output ends with the rest of it (a one-token sequence: always); the engine adds
    # those of bad_words, and any given here are kept
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        _check_bad_words(self)
        if isinstance(self.structured_outputs, dict):
            object.__setattr__(
                self, "structured_outputs", StructuredOutputs(**self.structured_outputs)
            )
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if self.allowed_token_ids is not None:
            object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        for name, ok, rule in (
            ("max_tokens", self.max_tokens >= 1, ">= 1"),
            ("temperature", 0.0 <= self.temperature <= 2.0, "in [0, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= -1, "-1 or 0 (off), or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0.0, "> 0"),
            ("n", self.n >= 1, ">= 1"),
            (
                "min_tokens",
                0 <= self.min_tokens <= self.max_tokens,
                f"in [0, max_tokens = {self.max_tokens}]",
            ),
            (
                "logprobs",
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"in [0, {MAX_LOGPROBS}]",
            ),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                f"in [0, {MAX_LOGPROBS}]",
            ),
            (
                "seed",
                self.seed is None or SEED_RANGE[0] <= self.seed <= SEED_RANGE[1],
                f"in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]",
            ),
            ("logit_bias", all(math.isfinite(v) for v in self.logit_bias.values()), "finite"),
            (
                "allowed_token_ids",
                self.allowed_token_ids is None or len(self.allowed_token_ids) > 0,
                "None or not empty",
            ),
            (
                "min_tokens",
                self.structured_outputs is None or self.min_tokens == 0,
                "0 with structured_outputs, whose grammar decides where the output ends",
            ),
        ):
            if not ok:
                raise ValueError(f"invalid {name}: {getattr(self, name)!r} (must be {rule})")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


def _check_bad_words(params: SamplingParams) -> None:
    """bad_words as a tuple of strings with something besides whitespace, bad_words_token_ids
    as a tuple of non-empty tuples of token ids (>= 0; the engine checks them against its
    vocabulary); ValueError otherwise."""
    words = params.bad_words
    if isinstance(words, str) or not isinstance(words, list | tuple):
        raise ValueError(f"invalid bad_words: {words!r} (must be a list of strings)")
    if not all(isinstance(w, str) and w.strip() for w in words):
        raise ValueError(
            f"invalid bad_words: {words!r} (must be strings, each with a non-space character)"
        )
    object.__setattr__(params, "bad_words", tuple(words))
    sequences = params.bad_words_token_ids
    rule = "a list of non-empty lists of token ids"
    if not isinstance(sequences, list | tuple) or not all(
        isinstance(ids, list | tuple)
        and ids
        and all(type(t) is int and t >= 0 for t in ids)  # a bool or a float is no token
        for ids in sequences
    ):
        raise ValueError(f"invalid bad_words_token_ids: {sequences!r} (must be {rule})")
    object.__setattr__(params, "bad_words_token_ids", tuple(tuple(ids) for ids in sequences))
