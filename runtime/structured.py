"""Structured outputs: a JSON schema, any JSON object, a regex, a choice of strings or an EBNF
grammar, enforced token by token with xgrammar's grammar matchers, as vLLM does.

Each step, a constrained sequence's matcher says which tokens may come next (a bitmask over
the vocabulary) and the sampler sets the others' logits to -inf; the engine then gives the
matcher the token picked, once it is on the host (with asynchronous steps, as it lands).
The mask is applied with torch, on whatever device the logits are.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from runtime.sampling_params import StructuredOutputs

# compiled grammars xgrammar keeps for reuse, at most (vLLM's default)
CACHE_LIMIT_BYTES = 512 << 20
# JSON's whitespace between tokens, at most, in a row (a newline counts): room for a newline
# and a 4-space indent 7 levels deep, not for a model that would pad its JSON with
# whitespace till max_tokens
MAX_JSON_WHITESPACE = 32


class Grammars:
    """Compiles structured outputs for one tokenizer; xgrammar caches what it compiled."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        try:
            import xgrammar
        except ModuleNotFoundError:
            raise ValueError(
                "structured outputs need xgrammar: pip install 'kiln-llm[structured]'"
            ) from None
        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids)
        )
        self._compiler = xgrammar.GrammarCompiler(info, cache_limit_bytes=CACHE_LIMIT_BYTES)

    def matcher(self, spec: StructuredOutputs) -> Any:
        """A fresh matcher (one per sequence); ValueError for a spec that does not compile."""
        return self._xgr.GrammarMatcher(self.compile(spec))

    def compile(self, spec: StructuredOutputs) -> Any:
        """The compiled grammar, from xgrammar's cache once compiled; ValueError for a spec
        that does not compile. Thread-safe: a server compiles off its engine's thread."""
        try:
            return self._compile(spec)
        except RuntimeError as exc:  # xgrammar's parse errors, after its log prefix
            message = str(exc).strip().splitlines()[-1]
            message = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", message)
            raise ValueError(f"structured outputs: {message}") from None

    def _compile(self, spec: StructuredOutputs) -> Any:
        c = self._compiler
        if spec.json is not None or spec.json_object:
            # json_object: an object, as OpenAI's JSON mode gives (not any JSON value)
            schema = spec.json if spec.json is not None else json.dumps({"type": "object"})
            return c.compile_json_schema(schema, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if spec.regex is not None:
            return c.compile_regex(spec.regex)
        if spec.choice is not None:  # JSON string escapes are the grammar's too
            literals = (json.dumps(option, ensure_ascii=False) for option in spec.choice)
            return c.compile_grammar("root ::= " + " | ".join(literals))
        return c.compile_grammar(spec.grammar)


def allowed(matchers: list[Any], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[len(matchers), vocab_size] bool: the tokens each matcher allows next."""
    import xgrammar

    bitmask = xgrammar.allocate_token_bitmask(len(matchers), vocab_size)
    for row, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    pinned = bitmask.pin_memory() if device.type == "cuda" else bitmask
    return unpack_bitmask(pinned.to(device, non_blocking=True), vocab_size)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, ceil(V / 32)] int32 (token t allowed: bit t % 32 of word t // 32) -> [B, V] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab_size].bool()
