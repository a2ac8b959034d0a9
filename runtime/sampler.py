"""Token sampler: penalties, temperature, top-k/top-p/min-p, per-request seeds, logprobs."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from runtime.bad_words import BadWords
from runtime.outputs import Logprob
from runtime.sampling_params import SamplingParams
from runtime.structured import allowed


@dataclass(slots=True)
class SamplingState:
    """One sequence's sampling inputs; the engine keeps it across steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # appended to by the engine; only read here
    eos_token_ids: tuple[int, ...]  # banned while the output is shorter than min_tokens
    generator: torch.Generator | None  # None: draw from torch's default generator
    matcher: Any = None  # structured outputs: the grammar matcher (runtime/structured.py)
    # a token its grammar refused was picked (no token was left to pick): the output ends
    grammar_refused: bool = field(init=False, default=False)
    # greedy with nothing to adjust: the token is the argmax of the raw logits (logprobs,
    # if asked for, come from the raw logits apart)
    plain_greedy: bool = field(init=False)
    # allowed_token_ids as a mask of the tokens it may not pick, made at its first step
    banned: torch.Tensor | None = field(init=False, default=None)
    bad_words: BadWords | None = field(init=False)  # its params' bad_words_token_ids

    def __post_init__(self) -> None:
        p = self.params
        self.bad_words = BadWords(p.bad_words_token_ids) if p.bad_words_token_ids else None
        self.plain_greedy = (
            p.greedy
            and not p.logit_bias
            and not p.bad_words_token_ids
            and p.allowed_token_ids is None
            and p.repetition_penalty == 1.0
            and p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0
            and p.min_tokens == 0
            and self.matcher is None
        )

    def accept(self, token: int) -> None:
        """The engine's word that `token` is the sequence's next: its grammar moves past it
        (before the next step's mask is made; with asynchronous scheduling, once it lands)."""
        if self.matcher is not None and not self.matcher.accept_token(token):
            self.grammar_refused = True


# Not frozen: a frozen dataclass builds ~3x slower, and there is one per sampled token.
@dataclass(slots=True)
class SampledToken:
    token_id: int
    # the sampled token and the top `params.logprobs` tokens; None when logprobs were not asked
    logprobs: dict[int, Logprob] | None


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator for one seeded sequence (the engine passes params.seed + sample index)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


ARGMAX_CHUNK = 256  # logits a first-pass row of `argmax_rows` covers, at most


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) of a [B, V] tensor, the first maximum's index as there, in two passes
    when V splits into chunks of 64+: the maximum of each chunk, then the best chunk. On a
    GPU one row's argmax is a single block's serial reduction (35 us over 128K logits on the
    H200); the chunks' maxima run in parallel."""
    rows, vocab = x.shape
    chunk = math.gcd(vocab, ARGMAX_CHUNK)
    if chunk < 64:
        return x.argmax(dim=-1)
    best, where = x.reshape(rows, vocab // chunk, chunk).max(dim=-1)
    column = best.argmax(dim=-1, keepdim=True)
    return (column * chunk + where.gather(1, column)).squeeze(1)


def sample(logits: torch.Tensor, states: list[SamplingState]) -> list[SampledToken]:
    """Pick one token per row of `logits` [B, V] and report the requested logprobs."""
    picked = sample_ids(logits, states)
    ranked = sampled_logprobs(logits, picked, states)  # queued before the wait for the tokens
    tokens = picked.tolist()
    logprobs = ranked.by_row(tokens) if ranked is not None else {}
    return [SampledToken(t, logprobs.get(row)) for row, t in enumerate(tokens)]


def sample_ids(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """The tokens `sample` picks, as an int64 tensor on the logits' device, without waiting for
    them. Their logprobs, where asked for, come from `sampled_logprobs`."""
    if all(s.plain_greedy for s in states):  # e.g. an offline greedy batch: no row work
        return argmax_rows(logits)
    return _pick(logits.float(), states)


def _pick(raw: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    processed = apply_penalties(raw, states)
    _mask_grammars(processed, states)
    token_ids = argmax_rows(processed)
    rows = [i for i, s in enumerate(states) if not s.params.greedy]
    if rows:
        index = _on(raw.device, rows)
        picked = [states[i] for i in rows]
        probs = torch.softmax(apply_filters(processed[index], picked), dim=-1)
        token_ids[index] = _draw(probs, [s.generator for s in picked])
    return token_ids


def apply_penalties(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Logit bias, the allowed tokens, the bad words' bans, repetition/frequency/presence
    penalties and the min_tokens ban, as float32.

    Returns a new tensor; `logits` is left untouched (its raw values feed the logprobs).
    """
    out = logits.to(torch.float32, copy=True)
    _add_logit_bias(out, states)
    _allow_only(out, states)
    _ban_bad_words(out, states)
    _apply_repetition_penalty(out, states)
    _apply_frequency_presence(out, states)
    _ban_stop_tokens(out, states)
    return out


def apply_filters(logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
    """Temperature, then min-p, top-k and top-p (vLLM's order: top-p counts the mass left
    after min-p); filtered-out tokens get -inf.

    Every row must be a sampled (non-greedy) one: its temperature is divided in.
    """
    device = logits.device
    temperature = _on(device, [s.params.temperature for s in states], torch.float32)
    out = logits / temperature.unsqueeze(1)
    min_p = [s.params.min_p for s in states]
    if max(min_p) > 0.0:
        probs = torch.softmax(out, dim=-1)
        threshold = _on(device, min_p, torch.float32).unsqueeze(1) * probs.amax(-1, keepdim=True)
        out.masked_fill_(probs < threshold, -torch.inf)
    vocab = out.shape[-1]
    top_k = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in states]
    top_p = [s.params.top_p for s in states]
    if min(top_k) < vocab or min(top_p) < 1.0:
        _top_k_top_p(out, _on(device, top_k), _on(device, top_p, torch.float32))
    return out


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> None:
    """In place; top_k == vocab and top_p == 1 leave a row alone. Ties at the k-th value stay."""
    ordered, order = logits.sort(dim=-1, descending=True)
    kth = ordered.gather(1, (top_k - 1).unsqueeze(1))
    ordered.masked_fill_(ordered < kth, -torch.inf)
    probs = torch.softmax(ordered, dim=-1)
    # keep the smallest head whose mass reaches top_p: a token stays if the mass before it is short
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    drop[:, 0] = False  # the most likely token stays, even for a top_p float32 rounds to 0
    ordered.masked_fill_(drop, -torch.inf)
    logits.scatter_(1, order, ordered)


def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample one token per row by the exponential race: argmax(p / E), E ~ Exp(1).

    A seeded row draws only from its own generator, so its token does not depend on the
    rest of the batch.
    """
    noise = torch.empty_like(probs)
    if all(g is None for g in generators):
        noise.exponential_()
    else:
        for row, generator in enumerate(generators):
            noise[row].exponential_(generator=generator)
    # a zero draw would make 0/0 = nan, and argmax prefers nan over everything
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    return argmax_rows(probs / noise)


def sampled_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, states: list[SamplingState]
) -> Ranked | None:
    """For the rows whose states ask for logprobs: the logprobs of the raw model logits there
    (the picked `token_ids`' and the top-n), on the logits' device, not waited for. None
    when no row asks."""
    rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if not rows:
        return None
    index = _on(logits.device, rows)
    top = [states[i].params.logprobs for i in rows]
    return rank(logits[index].float(), token_ids[index], top, rows)


PROMPT_LOGPROBS_ROWS = 512  # rows of prompt logits turned into float32 at a time


def prompt_logprobs(
    logits: torch.Tensor, rows: list[int], tokens: list[int], top: list[int]
) -> list[dict[int, Logprob]]:
    """Per row r of `rows` (a prompt position's row of `logits` [R, V]), the logprob of the
    prompt token that follows it, `tokens[r]`, and of the `top[r]` most likely tokens. The
    rows are taken PROMPT_LOGPROBS_ROWS at a time: a long prompt's float32 logprobs are
    never all held at once."""
    out = []
    for first in range(0, len(rows), PROMPT_LOGPROBS_ROWS):
        part = slice(first, first + PROMPT_LOGPROBS_ROWS)
        picked = logits[torch.tensor(rows[part], device=logits.device)].float()
        out += ranked_logprobs(picked, tokens[part], top[part])
    return out


def ranked_logprobs(
    logits: torch.Tensor, tokens: list[int], top: list[int]
) -> list[dict[int, Logprob]]:
    """Per row of float32 `logits` [R, V]: tokens[r]'s logprob and the top[r] most likely
    tokens', each with its rank (1: the most likely)."""
    chosen = torch.tensor(tokens, device=logits.device)
    return rank(logits, chosen, top, list(range(len(tokens)))).entries(tokens)


@dataclass(slots=True)
class Ranked:
    """Logprobs of R rows of logits: a chosen token's per row, with its rank, and the top
    max(top) tokens'; on the logits' device until `to_host`."""

    rows: list[int]  # which rows of the batch these are
    top: list[int]  # per row, how many of the top tokens to report
    chosen: torch.Tensor  # [R] float32: the chosen token's logprob
    chosen_rank: torch.Tensor  # [R] int64
    top_logprobs: torch.Tensor  # [R, max(top)] float32, descending
    top_ids: torch.Tensor  # [R, max(top)] int64

    def to_host(self) -> Ranked:
        """A copy in host memory, started behind the work queued on the device (pinned when
        it is a GPU); read it once that work is done."""
        return Ranked(self.rows, self.top, *(host_copy(t) for t in self._tensors()))

    def entries(self, tokens: list[int]) -> list[dict[int, Logprob]]:
        """Per row, {token: Logprob}: tokens[r] (the chosen one) and the top[r] ranked 1..n."""
        chosen, ranks, top_lps, top_ids = (t.tolist() for t in self._tensors())
        columns = zip(tokens, self.top, chosen, ranks, top_lps, top_ids, strict=True)
        result = []
        for token, n, lp, r, lps, ids in columns:
            entry = {token: Logprob(lp, r)}
            entry.update(
                (t, Logprob(v, k)) for k, (t, v) in enumerate(zip(ids[:n], lps[:n], strict=True), 1)
            )
            result.append(entry)
        return result

    def by_row(self, token_ids: list[int]) -> dict[int, dict[int, Logprob]]:
        """The entries keyed by batch row, given every row's chosen token."""
        entries = self.entries([token_ids[r] for r in self.rows])
        return dict(zip(self.rows, entries, strict=True))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.chosen_rank, self.top_logprobs, self.top_ids


def rank(logits: torch.Tensor, chosen: torch.Tensor, top: list[int], rows: list[int]) -> Ranked:
    """The logprobs of float32 `logits` [R, V] (the batch's `rows`) for the `chosen` token of
    each row ([R] int64, on the logits' device) and for the top max(top) tokens, without
    waiting for the device."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))
    # as vLLM ranks them: the chosen token after every token as likely (ties included), so
    # one outside the top n ranks past n; the top-k by position, 1..k, so ranks <= n are n
    chosen_rank = (logprobs >= chosen_lp).sum(-1)
    top_lp, top_ids = logprobs.topk(max(top), dim=-1)
    return Ranked(rows, top, chosen_lp.squeeze(1), chosen_rank, top_lp, top_ids)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory (pinned for a GPU tensor), started behind the work queued
    on the device; complete once that work is."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=True)
    return host


def _on(device: torch.device, values: list, dtype: torch.dtype | None = None) -> torch.Tensor:
    """values as a tensor on `device`, without waiting for the GPU: built in pinned memory and
    copied behind the work already queued (a plain copy would wait for that work to finish,
    and asynchronous scheduling has the next step queued by the time a step samples)."""
    host = torch.tensor(values, dtype=dtype, pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)


def _rows_tokens(
    token_lists: list[list[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, token) index pairs for a ragged list of token lists."""
    lengths = [len(t) for t in token_lists]
    rows = torch.repeat_interleave(
        torch.arange(len(token_lists), device=device),
        _on(device, lengths, torch.int64),
        output_size=sum(lengths),  # known here: no wait for the device to count
    )
    tokens = _on(device, list(itertools.chain.from_iterable(token_lists)), torch.int64)
    return rows, tokens


def _add_logit_bias(logits: torch.Tensor, states: list[SamplingState]) -> None:
    biases = [s.params.logit_bias for s in states]
    if not any(biases):
        return
    rows, tokens = _rows_tokens([list(b) for b in biases], logits.device)
    values = _on(logits.device, [v for b in biases for v in b.values()], torch.float32)
    logits.index_put_((rows, tokens), values, accumulate=True)


def _allow_only(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Rows with allowed_token_ids: every other token -inf."""
    rows = [i for i, s in enumerate(states) if s.params.allowed_token_ids is not None]
    if not rows:
        return
    for i in rows:
        if states[i].banned is None:  # once a request: a list may be the whole vocabulary
            banned = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
            ids = sorted(set(states[i].params.allowed_token_ids))
            states[i].banned = banned.index_fill_(0, _on(logits.device, ids, torch.int64), False)
    index = _on(logits.device, rows)
    banned = torch.stack([states[i].banned for i in rows])
    logits[index] = logits[index].masked_fill(banned, float("-inf"))


def _ban_bad_words(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Rows with bad words: -inf for each token that would complete one (its prefix ending
    the output so far)."""
    if not any(s.bad_words for s in states):
        return
    banned = [s.bad_words.banned(s.output_token_ids) if s.bad_words else [] for s in states]
    if any(banned):
        logits[_rows_tokens(banned, logits.device)] = -torch.inf


def _apply_repetition_penalty(logits: torch.Tensor, states: list[SamplingState]) -> None:
    rows = [i for i, s in enumerate(states) if s.params.repetition_penalty != 1.0]
    if not rows:
        return
    device = logits.device
    seen = torch.zeros(len(rows), logits.shape[-1], dtype=torch.bool, device=device)
    history = [states[i].prompt_token_ids + states[i].output_token_ids for i in rows]
    seen[_rows_tokens(history, device)] = True
    penalty = _on(device, [states[i].params.repetition_penalty for i in rows], torch.float32)
    penalty = penalty.unsqueeze(1)
    index = _on(device, rows)
    sub = logits[index]
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    logits[index] = torch.where(seen, penalized, sub)


def _apply_frequency_presence(logits: torch.Tensor, states: list[SamplingState]) -> None:
    rows = [
        i
        for i, s in enumerate(states)
        if s.params.frequency_penalty != 0.0 or s.params.presence_penalty != 0.0
    ]
    if not rows:
        return
    device = logits.device
    counts = torch.zeros(len(rows), logits.shape[-1], device=device)
    where = _rows_tokens([states[i].output_token_ids for i in rows], device)
    counts.index_put_(where, torch.ones(where[0].shape, device=device), accumulate=True)
    frequency = _on(device, [states[i].params.frequency_penalty for i in rows], torch.float32)
    presence = _on(device, [states[i].params.presence_penalty for i in rows], torch.float32)
    index = _on(device, rows)
    logits[index] -= frequency.unsqueeze(1) * counts + presence.unsqueeze(1) * (counts > 0)


def _mask_grammars(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Structured outputs: -inf for every token a sequence's grammar does not allow next. A
    grammar ended already leaves its row alone: an asynchronous step samples once more for
    a sequence that ends on the token it has not read back yet, and that sample is dropped."""
    rows = [
        i for i, s in enumerate(states) if s.matcher is not None and not s.matcher.is_terminated()
    ]
    if not rows:
        return
    index = _on(logits.device, rows)
    ok = allowed([states[i].matcher for i in rows], logits.shape[-1], logits.device)
    logits[index] = logits[index].masked_fill(~ok, -torch.inf)


def _ban_stop_tokens(logits: torch.Tensor, states: list[SamplingState]) -> None:
    """Before min_tokens outputs, no stop token id (nor EOS, unless ignored) may be sampled."""
    banned = [
        [] if len(s.output_token_ids) >= s.params.min_tokens else _stop_ids(s) for s in states
    ]
    if any(banned):
        logits[_rows_tokens(banned, logits.device)] = -torch.inf


def _stop_ids(state: SamplingState) -> list[int]:
    eos = () if state.params.ignore_eos else state.eos_token_ids
    return [*eos, *state.params.stop_token_ids]
