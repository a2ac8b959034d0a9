"""Engine: requests in, one scheduled + executed + sampled step at a time, outputs out.

With asynchronous scheduling (the default on a GPU) a step's sampled tokens stay on the
device: the next step is scheduled with a stand-in for each (`sequence.pending`) and launched
on them before they are read back, so the host's work overlaps the GPU's. A call to `step`
then returns the previous step's tokens; a sequence that ends on one has run one step more
than it needed, and that step's token is dropped. Logprobs come back with the tokens; a
grammar (structured outputs) takes its sequence's token as it lands, which is before the
next step samples.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from compiler.artifact import Artifact, load_artifact
from runtime.config import EngineConfig
from runtime.detokenizer import IncrementalDetokenizer
from runtime.model_runner import make_runner, max_model_len
from runtime.outputs import CompletionOutput, Logprob, RequestOutput, RequestTimes
from runtime.sampler import (
    Ranked,
    SampledToken,
    SamplingState,
    host_copy,
    make_generator,
    prompt_logprobs,
    sample,
    sample_ids,
    sampled_logprobs,
)
from runtime.sampling_params import SamplingParams, StructuredOutputs, resolve_bad_words
from runtime.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from runtime.sequence import Sequence, pending
from runtime.stats import ITERATION_TOKENS_BUCKETS
from runtime.structured import Grammars

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Request:
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


@dataclass(slots=True)
class _InFlight:
    """A step whose sampled tokens have not been read back yet."""

    seqs: list[tuple[int, Sequence]]  # (row of ids, seq whose last output is pending(row))
    ids: torch.Tensor  # int64 on the runner's device, a row per sampled chunk
    host: torch.Tensor  # their copy on the host, complete once `ready` is
    # the logprobs of the rows that asked for them, copied to the host with the ids
    logprobs: Ranked | None
    ready: torch.cuda.Event | None  # None: a CPU step, copied already


class Engine:
    def __init__(self, artifact: Artifact, config: EngineConfig | None = None) -> None:
        config = config or EngineConfig()
        self.artifact = artifact
        self.tokenizer = artifact.load_tokenizer()
        self.max_model_len = max_model_len(artifact, config)
        self.vocab_size = artifact.manifest["vocab_size"]
        self.eos_token_ids = tuple(artifact.manifest["eos_token_ids"])
        self.runner = make_runner(artifact, config)
        self.scheduler = Scheduler(
            SchedulerConfig(
                num_blocks=self.runner.num_blocks,
                block_size=self.runner.block_size,
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                enable_prefix_caching=config.enable_prefix_caching,
                policy=config.policy,
            )
        )
        self.async_scheduling = _async_scheduling(config, self.runner)
        self._in_flight: _InFlight | None = None
        self.requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self.num_computed_tokens = 0  # tokens run through the model (prefix hits excluded)
        self.num_prompt_tokens = 0  # prompts' tokens, each counted at its request's first token
        self.num_generation_tokens = 0  # tokens output
        # steps by the tokens they ran, one count per bucket (the last: more than any bound)
        self.iteration_tokens = [0] * (len(ITERATION_TOKENS_BUCKETS) + 1)
        self.grammars: Grammars | None = None  # structured outputs' compiler, once needed
        self._grammars_made = threading.Lock()

    @classmethod
    def load(cls, path: Path, config: EngineConfig | None = None) -> Engine:
        """The engine of the artifact at `path`."""
        return cls(load_artifact(path), config)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request; raises ValueError if it can never be served."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = resolve_bad_words(params, self.tokenizer)  # bad_words as token ids
        for name, ids in (
            ("prompt", prompt_token_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", params.logit_bias),
            ("allowed_token_ids", params.allowed_token_ids or ()),
            ("bad_words", [t for word in params.bad_words_token_ids for t in word]),
        ):
            bad = [t for t in ids if type(t) is not int or not 0 <= t < self.vocab_size]
            wrong = [t for t in bad if type(t) is not int]  # a float or a bool is no token
            if wrong:
                raise ValueError(f"{name}: token ids must be ints, got {wrong[:5]!r}")
            if bad:
                raise ValueError(
                    f"{name}: token ids out of vocabulary (size {self.vocab_size}): {bad[:5]}"
                )
        allowed = set(params.allowed_token_ids or ())
        ends = set(params.stop_token_ids) | set(() if params.ignore_eos else self.eos_token_ids)
        if params.min_tokens and allowed and allowed <= ends:
            raise ValueError(
                "allowed_token_ids: each one ends the output, which min_tokens forbids at first"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer, and this model has none")
        spec = params.structured_outputs
        matchers = [self._grammars().matcher(spec) for _ in range(params.n)] if spec else None
        now = time.monotonic()
        seqs = [
            Sequence(
                next(self._seq_ids), request_id, list(prompt_token_ids), params, now, priority, i
            )
            for i in range(params.n)
        ]
        device = self.runner.device
        request = _Request(
            request_id,
            prompt,
            list(prompt_token_ids),
            seqs,
            [
                SamplingState(
                    params,
                    seq.prompt_token_ids,
                    seq.output_token_ids,
                    self.eos_token_ids,
                    None if params.seed is None else make_generator(params.seed + i, device),
                    matchers[i] if matchers else None,
                )
                for i, seq in enumerate(seqs)
            ],
            [self._detokenizer(prompt_token_ids, params) for _ in seqs],
            [None] * len(seqs),
            None if params.prompt_logprobs is None else [None],
        )
        for seq in seqs:  # equal lengths: if any cannot fit, the first raises, nothing is queued
            self.scheduler.add(seq)
        self.requests[request_id] = request

    def compile_grammar(self, spec: StructuredOutputs) -> None:
        """Compile a request's structured outputs ahead of `add_request`, which then finds the
        grammar compiled; ValueError if it does not compile. Safe on any thread: the server
        calls it off the engine's, whose steps a long compile would hold up."""
        self._grammars().compile(spec)

    def _grammars(self) -> Grammars:
        """The compiler of structured outputs, made at the first request that has them."""
        if self.tokenizer is None:
            raise ValueError("structured outputs need a tokenizer, and this model has none")
        with self._grammars_made:
            if self.grammars is None:
                self.grammars = Grammars(self.tokenizer, self.vocab_size, self.eos_token_ids)
        return self.grammars

    def _detokenizer(self, prompt_token_ids, params) -> IncrementalDetokenizer | None:
        if self.tokenizer is None:
            return None
        return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)

    def close(self) -> None:
        """Abort what is in flight and release the runner (TP worker processes)."""
        for request_id in list(self.requests):
            self.abort(request_id)
        self._in_flight = None
        self.runner.close()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    def step(self) -> list[RequestOutput]:
        """Run one batch; returns an update (deltas) for every request that got tokens (with
        asynchronous scheduling: the tokens of the step before, still in flight till now)."""
        plan = self.scheduler.schedule()
        flight, self._in_flight = self._in_flight, None
        if plan.chunks:
            try:
                logits = self.runner.execute(plan.chunks, flight.ids if flight else None)
            except BaseException:  # interrupted or failed: nothing of this step happened
                self._in_flight = flight  # the step before it still lands
                self.scheduler.undo(plan)
                raise
            num_tokens = plan.num_batched_tokens
            self.num_computed_tokens += num_tokens
            self.iteration_tokens[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, num_tokens)] += 1
            seqs = [c.seq for c in plan.chunks if c.sample]
            states = [self.requests[s.request_id].states[s.index] for s in seqs]
            logits, scoring = logits[: len(seqs)], logits[len(seqs) :]
        # while the GPU runs this step, the last one's tokens: they may end sequences of it
        outputs = self._land(flight) if flight else []
        if not plan.chunks:
            return outputs
        if self.async_scheduling:
            ids = sample_ids(logits, states)
            self._launch_sampling(plan, seqs, ids, sampled_logprobs(logits, ids, states))
            self._score_prompts(plan.chunks, scoring)
            return outputs
        tokens = sample(logits, states)
        self._score_prompts(plan.chunks, scoring)
        self.scheduler.update(
            plan, {s.seq_id: t.token_id for s, t in zip(seqs, tokens, strict=True)}
        )
        kept = [(s, t) for s, t in zip(seqs, tokens, strict=True) if not s.is_finished]
        return outputs + self._outputs([s for s, _ in kept], [t for _, t in kept])

    def _launch_sampling(
        self,
        plan: SchedulerOutput,
        seqs: list[Sequence],
        ids: torch.Tensor,
        logprobs: Ranked | None,
    ) -> None:
        """Record the step with stand-ins for its tokens and start copying them (and their
        logprobs) back."""
        live = [(row, s) for row, s in enumerate(seqs) if not s.is_finished]
        self.scheduler.update(plan, {s.seq_id: pending(row) for row, s in live})
        if not live:
            return
        if logprobs is not None:
            logprobs = logprobs.to_host()
        host = host_copy(ids)
        ready = None
        if ids.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        self._in_flight = _InFlight(live, ids, host, logprobs, ready)

    def _score_prompts(self, chunks: tuple[ScheduledChunk, ...], logits: torch.Tensor) -> None:
        """Prompt logprobs from the step's scoring rows (each chunk's `prompt_logits`, in
        chunk order), for the prompt tokens no sequence of the request has scored yet."""
        if logits.shape[0] == 0:
            return
        picked, tokens, top, owners = [], [], [], []
        scored: dict[str, int] = {}  # request id -> prompt tokens scored, this step's counted
        row = 0  # the chunk's first scoring row
        for chunk in chunks:
            if not chunk.prompt_logits:
                continue
            seq = chunk.seq
            request = self.requests[seq.request_id]
            done = scored.get(seq.request_id, len(request.prompt_logprobs))
            # position p scores prompt token p + 1; a sequence recomputing its prompt after a
            # preemption, or the request's other samples, reach positions scored already
            first, end = max(chunk.start, done - 1), chunk.start + chunk.prompt_logits
            picked += range(row + first - chunk.start, row + end - chunk.start)
            tokens += seq.prompt_token_ids[first + 1 : end + 1]
            top += [seq.params.prompt_logprobs] * max(0, end - first)
            owners += [request] * max(0, end - first)
            scored[seq.request_id] = max(done, end + 1)
            row += chunk.prompt_logits
        entries = prompt_logprobs(logits, picked, tokens, top)
        self._decode_all(entries)
        for request, entry in zip(owners, entries, strict=True):
            request.prompt_logprobs.append(entry)
        for request_id in scored:  # scored in full: the request's prompt may come from cache
            request = self.requests[request_id]
            if len(request.prompt_logprobs) == len(request.prompt_token_ids):
                for seq in request.seqs:
                    seq.scores_prompt = False

    def _land(self, flight: _InFlight) -> list[RequestOutput]:
        """Read back a step's tokens in place of their stand-ins; the updates they make."""
        if flight.ready is not None:
            flight.ready.synchronize()
        ids = flight.host.tolist()
        logprobs = flight.logprobs.by_row(ids) if flight.logprobs is not None else {}
        seqs, tokens = [], []
        for row, seq in flight.seqs:
            if seq.is_finished:  # aborted while its token was in flight
                continue
            seq.output_token_ids[-1] = ids[row]
            seqs.append(seq)
            tokens.append(SampledToken(ids[row], logprobs.get(row)))
        return self._outputs(seqs, tokens)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now (its blocks free at once); returns its final update."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        live = [i for i, seq in enumerate(request.seqs) if not seq.is_finished]
        self.scheduler.abort(request_id)
        outs = [  # samples that had finished keep the finish reason they were sent
            CompletionOutput(i, text=self._take_text(request, i), finish_reason="abort")
            for i in live
        ]
        return self._request_output(request, outs, request.finished)

    def _outputs(self, seqs: list[Sequence], tokens: list[SampledToken]) -> list[RequestOutput]:
        """One update per request, its sequences' deltas in batch order; ended requests go."""
        self._decode_all([t.logprobs for t in tokens if t.logprobs is not None])
        now = time.monotonic()
        self.num_generation_tokens += len(seqs)
        updates: dict[str, RequestOutput] = {}
        for seq, token in zip(seqs, tokens, strict=True):
            request = self.requests[seq.request_id]
            out = self._completion(request, seq, token)
            # Only a sequence that just ended can end its request: the scan over the
            # request's sequences runs only then.
            finished = seq.is_finished and request.finished
            update = updates.get(seq.request_id)
            if update is None:
                update = updates[seq.request_id] = self._request_output(request, [out], finished)
                if request.first_token is None:
                    request.first_token = now
                    self.num_prompt_tokens += len(request.prompt_token_ids)
            else:
                update.outputs.append(out)
                update.finished = finished
            if finished:
                update.times = request.times(now)
                del self.requests[seq.request_id]
        return list(updates.values())

    def _completion(
        self, request: _Request, seq: Sequence, token: SampledToken
    ) -> CompletionOutput:
        """The seq's delta for its new token, after checking whether that token ends it."""
        self._check_stop(request, seq, token.token_id)
        return CompletionOutput(
            seq.index,
            self._take_text(request, seq.index),
            [token.token_id],
            None if token.logprobs is None else [token.logprobs],
            seq.finish_reason,
            request.stop_reasons[seq.index],
        )

    def _request_output(
        self, request: _Request, outs: list[CompletionOutput], finished: bool
    ) -> RequestOutput:
        return RequestOutput(
            request.request_id,
            request.prompt,
            request.prompt_token_ids,
            outs,
            finished,
            request.seqs[0].num_cached_tokens,
            request.take_prompt_logprobs(),
        )

    def _check_stop(self, request: _Request, seq: Sequence, token: int) -> None:
        params, detok = seq.params, request.detoks[seq.index]
        state = request.states[seq.index]
        state.accept(token)
        # a grammar allows a stop token only where it may end: there it ends the output,
        # ignore_eos or not
        eos = token in self.eos_token_ids and (not params.ignore_eos or state.matcher is not None)
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
            request.stop_reasons[seq.index] = why
            self.scheduler.finish(seq, reason)

    def _take_text(self, request: _Request, index: int) -> str:
        detok = request.detoks[index]
        if detok is None:
            return ""
        return detok.take_delta(finished=request.seqs[index].is_finished)

    def _decode_all(self, entries: list[dict[int, Logprob]]) -> None:
        """Each Logprob's token text, decoded alone, in one call to the tokenizer."""
        if self.tokenizer is None or not entries:
            return
        flat = [(token_id, lp) for entry in entries for token_id, lp in entry.items()]
        texts = self.tokenizer.batch_decode([[token_id] for token_id, _ in flat])
        for (_, lp), text in zip(flat, texts, strict=True):
            lp.decoded_token = text

    def stats(self) -> dict:
        """The scheduler's state now, and running totals (tokens, steps, preemptions)."""
        bm = self.scheduler.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generation_tokens,
            "computed_tokens": self.num_computed_tokens,  # the sum of iteration_tokens
            "iteration_tokens": tuple(self.iteration_tokens),  # per ITERATION_TOKENS_BUCKETS
        }


def _async_scheduling(config: EngineConfig, runner) -> bool:
    """config.async_scheduling, by default on for a GPU runner."""
    if config.async_scheduling is None:
        return runner.device.type == "cuda"
    return config.async_scheduling
