"""What the engine hands back per request: plain data shared by the LLM API and the server."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Logprob:
    """Log-probability of one token; `rank` is 1 for the most likely token."""

    logprob: float
    rank: int
    decoded_token: str | None = None

    def __reduce__(self):  # pickled as a call: half the time of slots' state (engine process)
        return Logprob, (self.logprob, self.rank, self.decoded_token)


@dataclass(slots=True)
class CompletionOutput:
    """One of the `n` sequences of a request.

    In a streamed update, `token_ids`/`text`/`logprobs` hold only what is new since the
    previous update (the delta); in a final, non-streamed result they hold everything.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    # one dict per token in token_ids: token id -> Logprob (the sampled token and the top-k)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" once finished
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestTimes:
    """Where a finished request's time went in the engine, in seconds (vLLM's phases): waiting
    from its arrival to its first scheduling (a preempted request's later waits are not
    counted), then prefill to its first token, then decode to its last."""

    queue: float
    prefill: float
    decode: float

    @property
    def inference(self) -> float:
        """First scheduled to last token."""
        return self.prefill + self.decode


@dataclass(slots=True)
class RequestOutput:
    """A request's state: its prompt and one CompletionOutput per sequence (`n` of them)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # with SamplingParams.prompt_logprobs: per prompt token, its logprob and the top-k (None
    # for the first, which nothing scores); in the first update once the prompt is computed
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    times: RequestTimes | None = None  # in the final update of a request that finished

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def text(self) -> str:
        return self.outputs[0].text


def merge_update(acc: RequestOutput | None, update: RequestOutput) -> RequestOutput:
    """Fold a streamed update (deltas) into the accumulated result of its request."""
    if acc is None:
        acc = RequestOutput(update.request_id, update.prompt, update.prompt_token_ids, [], False, 0)
    by_index = {o.index: o for o in acc.outputs}
    for delta in update.outputs:
        out = by_index.setdefault(delta.index, CompletionOutput(delta.index))
        out.text += delta.text
        out.token_ids += delta.token_ids
        if delta.logprobs is not None:
            out.logprobs = (out.logprobs or []) + delta.logprobs
        out.finish_reason = delta.finish_reason or out.finish_reason
        out.stop_reason = delta.stop_reason if delta.finish_reason else out.stop_reason
    acc.outputs = [by_index[i] for i in sorted(by_index)]
    acc.finished = update.finished
    acc.num_cached_tokens = update.num_cached_tokens
    acc.prompt_logprobs = update.prompt_logprobs or acc.prompt_logprobs
    acc.times = update.times
    return acc
