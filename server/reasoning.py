"""A reasoning model's thinking split from its answer (`kiln run --reasoning-parser NAME`), as
vLLM's reasoning parsers do: the text of the `<think>` ... `</think>` block is the message's
`reasoning_content`, the text after it its `content` (which a tool parser then reads).

`qwen3`: the output thinks when it opens with `<think>` (Qwen3 with thinking on; with it off,
the template closes the block in the prompt and the output is all answer). `deepseek_r1`:
the template opens the block, so the output thinks up to its `</think>` (DeepSeek-R1, QwQ,
Qwen3-Thinking). A block the output never closes (cut short by max_tokens) is all thinking.
A stream gives the same split as the whole text, however its deltas fall.
"""

from __future__ import annotations

from dataclasses import dataclass

START, END = "<think>", "</think>"


@dataclass(frozen=True, slots=True)
class ReasoningParser:
    """`opened`: the chat template opens the thinking block, the output need not."""

    opened: bool

    def split(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole output; None where there is none."""
        if not (self.opened or text.startswith(START)):
            return None, text or None
        reasoning, _, content = text.removeprefix(START).partition(END)
        return reasoning or None, content or None

    def stream(self) -> ReasoningStream:
        return ReasoningStream(self)


class ReasoningStream:
    """Splits a stream's text deltas. Text that may begin a tag is held until later text
    settles it; `finish` gives what is still held when the output ends."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser = parser
        self.text = ""  # the whole output so far
        self.sent = 0  # of `text`, what has been passed on
        self.opening = True  # the output's start may still be (or begin) `<think>`
        self.thinking = parser.opened

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning delta, content delta) that `delta` settles."""
        self.text += delta
        if self.opening:
            if START.startswith(self.text):
                return "", ""  # "<thi": the tag, or an answer that begins so
            self.opening = False
            if self.text.startswith(START):
                self.thinking, self.sent = True, len(START)
        if not self.thinking:
            return "", self._take(len(self.text))
        end = self.text.find(END, self.sent)
        if end < 0:  # hold a tail that could begin `</think>`
            ready = len(self.text)
            for k in range(min(len(END) - 1, len(self.text) - self.sent), 0, -1):
                if END.startswith(self.text[-k:]):
                    ready -= k
                    break
            return self._take(ready), ""
        reasoning = self._take(end)
        self.thinking, self.sent = False, end + len(END)
        return reasoning, self._take(len(self.text))

    def finish(self) -> tuple[str, str]:
        """What is held when the output ends: the rest of an unclosed block is thinking."""
        if self.opening:  # the whole output is "<think>" or shorter text that begins it
            rest = "" if self.text == START else self._take(len(self.text))
            self.sent = len(self.text)
            return (rest, "") if self.parser.opened else ("", rest)
        rest = self._take(len(self.text))
        return (rest, "") if self.thinking else ("", rest)

    def _take(self, upto: int) -> str:
        piece, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return piece


REASONING_PARSERS = {
    "qwen3": ReasoningParser(opened=False),
    "deepseek_r1": ReasoningParser(opened=True),
}
