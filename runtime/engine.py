"""Engine: requests in, one scheduled + executed + sampled step at a time, outputs out.

With asynchronous scheduling (the default on a GPU) a step's sampled tokens stay on the
device: the next step is scheduled with a stand-in for each (`sequence.pending`) and launched
on them before they are read back, so the host's work overlaps the GPU's. A call to `step`
then returns the previous step's tokens; a sequence that ends on one has run one step more
than it needed, and that step's token is dropped. Logprobs come back with the tokens; a
grammar (structured outputs) takes its sequence's token as it lands, which is before the
next step samples. A request's state, stop checks and updates: `runtime.requests`.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compiler.artifact import Artifact, load_artifact
from runtime.bad_words import resolve_bad_words
from runtime.config import EngineConfig
from runtime.model_runner import make_runner, max_model_len
from runtime.outputs import CompletionOutput, RequestOutput
from runtime.requests import Request, decode_logprobs, make_detokenizer, step_outputs
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
from runtime.sampling_params import SamplingParams, StructuredOutputs
from runtime.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from runtime.sequence import Sequence, pending
from runtime.stats import ITERATION_TOKENS_BUCKETS
from runtime.structured import Grammars


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
        self.requests: dict[str, Request] = {}
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
        if allowed and allowed <= {w[0] for w in params.bad_words_token_ids if len(w) == 1}:
            raise ValueError("allowed_token_ids: bad_words ban each one")
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
        request = Request(
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
            [make_detokenizer(self.tokenizer, prompt_token_ids, params) for _ in seqs],
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
        decode_logprobs(self.tokenizer, entries)
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
            CompletionOutput(i, text=request.take_text(i), finish_reason="abort") for i in live
        ]
        return request.output(outs, request.finished)

    def _outputs(self, seqs: list[Sequence], tokens: list[SampledToken]) -> list[RequestOutput]:
        """One update per request, its sequences' deltas in batch order; ended requests go."""
        decode_logprobs(self.tokenizer, [t.logprobs for t in tokens if t.logprobs is not None])
        now = time.monotonic()
        self.num_generation_tokens += len(seqs)
        updates, num_prompt_tokens = step_outputs(
            self.requests, seqs, tokens, now, self.eos_token_ids, self.scheduler.finish
        )
        self.num_prompt_tokens += num_prompt_tokens
        return updates

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
