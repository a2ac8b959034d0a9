"""One generated sequence of a request: its tokens, cache progress and block table."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from runtime.sampling_params import SamplingParams


def pending(row: int) -> int:
    """The stand-in output token for row `row` of a step's sampled tokens while they are still
    on the device (asynchronous scheduling): negative, so no real id is mistaken for it."""
    return -1 - row


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False, slots=True)
class Sequence:
    """Mutable per-sequence state, shared by the scheduler, the block manager and the engine.

    Invariant: num_computed_tokens <= num_tokens; the K/V of token_ids[:num_computed_tokens]
    lives in the blocks of block_table (block i holds positions [i*block_size, (i+1)*block_size)).
    """

    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = 0.0
    priority: int = 0  # lower value = served first when the scheduler uses priority
    index: int = 0  # which of the request's n samples this is
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when first scheduled
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    first_scheduled: float | None = None  # time.monotonic() when first admitted to run
    # its chunks score the prompt (prompt_logprobs) until the request has them all: till
    # then no prefix-cache hit may skip a prompt token's logits
    scores_prompt: bool = field(init=False)

    def __post_init__(self) -> None:
        self.scores_prompt = self.params.prompt_logprobs is not None

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host holds: all but a last output still pending."""
        out = self.output_token_ids
        return self.num_tokens - (1 if out and out[-1] < 0 else 0)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without copying the whole sequence (hot in block hashing)."""
        prompt = self.prompt_token_ids
        if end <= len(prompt):
            return prompt[start:end]
        n = len(prompt)
        return prompt[start:] + self.output_token_ids[max(start - n, 0) : end - n]
