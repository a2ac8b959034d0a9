"""Incremental detokenization with stop strings, on top of tokenizers' DecodeStream."""

from __future__ import annotations

import logging

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase

from runtime.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Prompt tokens that prime the stream, so the first output token decodes in context (a
# SentencePiece-style leading space survives); a few are enough and keep priming cheap.
_PROMPT_CONTEXT = 6
_INVALID_PREFIX = "Invalid prefix encountered"


class IncrementalDetokenizer:
    """Turns one sequence's generated tokens into text, one token at a time, and finds stop strings.

    `text` is the output so far (a matched stop string is cut off unless
    `include_stop_str_in_output`); `take_delta` hands it out in pieces that never contain a stop
    string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._skip_special_tokens = params.skip_special_tokens
        self._prefix = self._context(prompt_token_ids)
        self._stream = DecodeStream(self._prefix, self._skip_special_tokens)
        self._ids: list[int] = []  # the stream's output tokens (from its last restart)
        self._restart = 0  # where the text stood when the stream last restarted
        self._holding = False  # the stream holds text back (the last token gave none)
        self._stops = tuple(s for s in params.stop if s)
        self._include_stop = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self._num_tokens = 0
        self._sent = 0  # length of the text already handed out by take_delta
        self.text = ""
        self.stop_reason: str | None = None  # the stop string that ended the output

    @property
    def finished(self) -> bool:
        return self.stop_reason is not None

    def add(self, token_id: int) -> str | None:
        """Append one generated token; returns the stop string it completed, if any."""
        if self.finished:
            raise RuntimeError(f"output already ended by stop string {self.stop_reason!r}")
        self._num_tokens += 1
        chunk = self._step(token_id)
        self._holding = chunk is None
        if not chunk:
            return None
        start = len(self.text)
        self.text += chunk
        # as in vLLM, stop strings only count once min_tokens tokens came before
        if self._stops and self._num_tokens > self._min_tokens:
            return self._check_stop(start)
        return None

    def take_delta(self, finished: bool = False) -> str:
        """Text not handed out yet. Until the output ends (a stop string matched, or the caller
        says `finished`), a tail that could still grow into a stop string is held back."""
        if finished and self._holding and not self.finished:
            self.text += self._held_text()
            self._holding = False
        end = len(self.text)
        if not (finished or self.finished):
            end -= self._pending_stop_prefix()
        delta = self.text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta

    def _context(self, prompt_token_ids: list[int]) -> list[int]:
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        # DecodeStream takes a context that ends inside a character as output text, not as a
        # prefix; such a prompt (rare) gets no context at all
        if self._backend.decode(context, self._skip_special_tokens).endswith("\ufffd"):
            return []
        return context

    def _step(self, token_id: int) -> str | None:
        self._ids.append(token_id)
        try:
            return self._stream.step(self._backend, token_id)
        except Exception as e:  # tokenizers raises a bare Exception
            if _INVALID_PREFIX not in str(e):
                raise
            # a decoder whose output is not monotonic in its input breaks DecodeStream's
            # prefix; restart the stream from this token
            logger.warning("detokenizer: %s; restarting the decode stream", e)
            self._stream = DecodeStream(skip_special_tokens=self._skip_special_tokens)
            self._prefix, self._ids, self._restart = [], [token_id], len(self.text)
            return self._stream.step(self._backend, token_id)

    def _held_text(self) -> str:
        """The complete characters the stream holds back at the end of the output. It holds
        text while it waits for the rest of a character; when the output ends first (say,
        max_tokens cut it), the text before that character is still due, the unfinished
        character is not (decode() would show it as U+FFFD)."""
        decode = lambda ids: self._backend.decode(ids, self._skip_special_tokens)  # noqa: E731
        given = decode(self._prefix) + self.text[self._restart :]
        full = decode(self._prefix + self._ids)
        # a decoder the stream had to restart around may not extend what it gave: then give
        # nothing rather than wrong text
        return full[len(given) :].rstrip("\ufffd") if full.startswith(given) else ""

    def _check_stop(self, start: int) -> str | None:
        """Find the stop string that ends first inside the text added at `start` (as if the
        text had come a character at a time; of two ending together, the longer)."""
        found: tuple[int, int, str] | None = None
        for stop in self._stops:
            pos = self.text.find(stop, max(0, start - len(stop) + 1))
            if pos >= 0 and (found is None or (pos + len(stop), pos) < found[:2]):
                found = (pos + len(stop), pos, stop)
        if found is None:
            return None
        _, pos, stop = found
        self.text = self.text[: pos + len(stop) if self._include_stop else pos]
        self.stop_reason = stop
        return stop

    def _pending_stop_prefix(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max(
            (
                k
                for stop in self._stops
                for k in range(min(len(stop) - 1, len(self.text)), 0, -1)
                if self.text.endswith(stop[:k])
            ),
            default=0,
        )
