"""Completions' text offsets from engine deltas as the real engine sends them: what the fake
engine does not do (hold back the start of a stop string, skip special tokens' text)."""

from __future__ import annotations

import pytest
from conftest import smollm2_tokenizer
from fake_engine import fake_logprobs

from runtime.outputs import CompletionOutput, Logprob, RequestOutput
from runtime.sampling_params import SamplingParams
from runtime.token_bytes import token_bytes
from server.protocol import GenerateRequest, Prompt
from server.responses import Pieces


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def text_offsets(tok, params: SamplingParams, ids: list[int], texts: list[str]) -> list[int]:
    """The offsets of a streamed completion whose deltas are one token each, ids[k] adding
    texts[k]; the last one ends it."""
    req = GenerateRequest(False, (Prompt((1,), None, params),), 1, True, False, False, 0)
    pieces = Pieces(req, lambda t: tok.decode([t]), lambda t, skip: token_bytes(tok, t, skip))
    offsets = []
    for k, (token, text) in enumerate(zip(ids, texts, strict=True)):
        last = k == len(ids) - 1
        logprobs = [fake_logprobs(token, 1, len(tok))]
        out = CompletionOutput(0, text, [token], logprobs, "stop" if last else None)
        (piece,) = pieces.of(0, RequestOutput("r", None, [1], [out], last))
        offsets += piece.logprobs["text_offset"]
    return offsets


def test_tokens_past_a_stop_string_point_at_the_text_end(tok) -> None:
    ids = tok.encode(" 世界!")
    assert len(ids) == 7  # " ", 世 in 2 tokens, 界 in 3, "!"
    # stop "界!": the engine holds 界 back (it may start the stop string), then cuts it off
    texts = [" ", "", "世", "", "", "", ""]
    offsets = text_offsets(tok, SamplingParams(stop=("界!",)), ids, texts)
    assert offsets == [0, 1, 1, 2, 2, 2, 2]  # "!" would start at 3, past the text " 世"


@pytest.mark.parametrize(
    ("skip", "special_text", "want"),
    [(True, "", [0, 1, 1, 2, 2]), (False, "<|im_start|>", [0, 1, 13, 14, 14])],
)
def test_a_skipped_special_token_adds_no_text(tok, skip, special_text, want) -> None:
    ids = [*tok.encode("a"), tok.convert_tokens_to_ids("<|im_start|>"), *tok.encode(" 世")]
    texts = ["a", special_text, " ", "", "世"]
    assert text_offsets(tok, SamplingParams(skip_special_tokens=skip), ids, texts) == want


def test_prompt_logprobs_show_the_token_and_the_top_k_with_a_finite_floor() -> None:
    params = SamplingParams(prompt_logprobs=1)
    prompts = (Prompt((7, 8, 9), None, params),)
    req = GenerateRequest(False, prompts, 1, False, False, False, None, prompt_logprobs=1)
    pieces = Pieces(req, lambda t: f"<{t}>", lambda t, skip: b"")
    scored = [
        None,
        {8: Logprob(-0.5, 1, "eight"), 3: Logprob(-2.0, 2, "three")},  # 8 is the best
        {4: Logprob(-0.1, 1), 5: Logprob(-3.0, 2), 9: Logprob(float("-inf"), 900)},  # 9 is not
    ]
    out = CompletionOutput(0, "x", [1], None, "length")
    pieces.of(0, RequestOutput("r", None, [7, 8, 9], [out], True, 0, scored))
    assert pieces.prompt_logprobs(0) == [
        None,
        {"8": {"logprob": -0.5, "rank": 1, "decoded_token": "eight"}},
        {
            "4": {"logprob": -0.1, "rank": 1, "decoded_token": "<4>"},
            "9": {"logprob": -9999.0, "rank": 900, "decoded_token": "<9>"},
        },
    ]
