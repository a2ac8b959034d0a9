"""A request in the engine and the outputs it hands back.

A `Request` holds its sequences' sampling states and detokenizers; as its sequences' tokens
come in it checks each for the end of its sequence (a stop token, a stop string, max_tokens)
and builds the deltas (`CompletionOutput`) and updates (`RequestOutput`) the engine returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from runtime.detokenizer import IncrementalDetokenizer
from runtime.outputs import CompletionOutput, Logprob, RequestOutput, RequestTimes
from runtime.sampler import SampledToken, SamplingState
from runtime.sampling_params import SamplingParams
from runtime.sequence import Sequence

log = logging.getLogger(__name__)

# Ends a sequence with a finish reason (Scheduler.finish): its blocks free at once.
Finish = Callable[[Sequence, str], None]


@dataclass(slots=True)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    states: list[SamplingState]
    detoks: list[IncrementalDetokenizer | None]
    stop_reasons: list[int | str | None] = field(default_factory=list)
    # params.prompt_logprobs: one entry per prompt token scored so far (None: the first);
    # whichever of the request's sequences reaches a position first scores it
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    prompt_logprobs_sent: bool = False
    first_token: float | None = None  # time.monotonic() when its first token was output

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def times(self, now: float) -> RequestTimes:
        """Its phases, its last token output `now`. Each of its sequences was scheduled: each
        ended on a token of its own."""
        scheduled = min(s.first_scheduled for s in self.seqs)
        return RequestTimes(
            scheduled - self.seqs[0].arrival_time,
            self.first_token - scheduled,
            now - self.first_token,
        )

    def take_prompt_logprobs(self) -> list[dict[int, Logprob] | None] | None:
        """The prompt logprobs, once: when all are scored (by a sequence's first token)."""
        done = self.prompt_logprobs is not None and len(self.prompt_logprobs) == len(
            self.prompt_token_ids
        )
        if not done or self.prompt_logprobs_sent:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    def completion(
        self,
        seq: Sequence,
        token: SampledToken,
        eos_token_ids: tuple[int, ...],
        finish: Finish,
    ) -> CompletionOutput:
        """The seq's delta for its new token, after checking whether that token ends it."""
        self._check_stop(seq, token.token_id, eos_token_ids, finish)
        return CompletionOutput(
            seq.index,
            self.take_text(seq.index),
            [token.token_id],
            None if token.logprobs is None else [token.logprobs],
            seq.finish_reason,
            self.stop_reasons[seq.index],
        )

    def output(self, outs: list[CompletionOutput], finished: bool) -> RequestOutput:
        """An update of the request: `outs`, its sequences' deltas."""
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            outs,
            finished,
            self.seqs[0].num_cached_tokens,
            self.take_prompt_logprobs(),
        )

    def take_text(self, index: int) -> str:
        """Sequence `index`'s text since it was last taken."""
        detok = self.detoks[index]
        if detok is None:
            return ""
        return detok.take_delta(finished=self.seqs[index].is_finished)

    def _check_stop(
        self, seq: Sequence, token: int, eos_token_ids: tuple[int, ...], finish: Finish
    ) -> None:
        params, detok = seq.params, self.detoks[seq.index]
        state = self.states[seq.index]
        state.accept(token)
        # a grammar allows a stop token only where it may end: there it ends the output,
        # ignore_eos or not
        eos = token in eos_token_ids and (not params.ignore_eos or state.matcher is not None)
        by_token = eos or token in params.stop_token_ids
        # as in vLLM, a stop token's own text is output only with include_stop_str_in_output
        text = detok is not None and (not by_token or params.include_stop_str_in_output)
        stop_string = detok.add(token) if text else None
        reason, why = None, None
        if state.grammar_refused:
            log.warning("request %s: its grammar allowed no token; ending it", seq.request_id)
            reason = "stop"
        elif eos:
            reason = "stop"
        elif by_token:
            reason, why = "stop", token
        elif stop_string is not None:
            reason, why = "stop", stop_string
        # No max_model_len check: add() admits only prompt + max_tokens <= max_model_len.
        elif seq.num_output_tokens >= params.max_tokens:
            reason = "length"
        if reason is not None:
            self.stop_reasons[seq.index] = why
            finish(seq, reason)


def step_outputs(
    requests: dict[str, Request],
    seqs: list[Sequence],
    tokens: list[SampledToken],
    now: float,
    eos_token_ids: tuple[int, ...],
    finish: Finish,
) -> tuple[list[RequestOutput], int]:
    """One update per request, its sequences' deltas in batch order, for `seqs`' new `tokens`
    output `now`; ended requests leave `requests`. With them, the prompt tokens of the
    requests that output their first token."""
    num_prompt_tokens = 0
    updates: dict[str, RequestOutput] = {}
    for seq, token in zip(seqs, tokens, strict=True):
        request = requests[seq.request_id]
        out = request.completion(seq, token, eos_token_ids, finish)
        # Only a sequence that just ended can end its request: the scan over the
        # request's sequences runs only then.
        finished = seq.is_finished and request.finished
        update = updates.get(seq.request_id)
        if update is None:
            update = updates[seq.request_id] = request.output([out], finished)
            if request.first_token is None:
                request.first_token = now
                num_prompt_tokens += len(request.prompt_token_ids)
        else:
            update.outputs.append(out)
            update.finished = finished
        if finished:
            update.times = request.times(now)
            del requests[seq.request_id]
    return list(updates.values()), num_prompt_tokens


def make_detokenizer(
    tokenizer: PreTrainedTokenizerBase | None,
    prompt_token_ids: list[int],
    params: SamplingParams,
) -> IncrementalDetokenizer | None:
    """A sequence's detokenizer; None without a tokenizer (its text stays empty)."""
    if tokenizer is None:
        return None
    return IncrementalDetokenizer(tokenizer, prompt_token_ids, params)


def decode_logprobs(
    tokenizer: PreTrainedTokenizerBase | None, entries: list[dict[int, Logprob]]
) -> None:
    """Each Logprob's token text, decoded alone, in one call to the tokenizer."""
    if tokenizer is None or not entries:
        return
    flat = [(token_id, lp) for entry in entries for token_id, lp in entry.items()]
    texts = tokenizer.batch_decode([[token_id] for token_id, _ in flat])
    for (_, lp), text in zip(flat, texts, strict=True):
        lp.decoded_token = text
