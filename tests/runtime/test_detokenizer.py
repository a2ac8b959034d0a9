"""Incremental detokenizer tests with the real SmolLM2 tokenizer (from the bundled GGUF file)."""

from __future__ import annotations

import pytest
from conftest import smollm2_tokenizer
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from runtime.detokenizer import IncrementalDetokenizer
from runtime.sampling_params import SamplingParams

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def f(x):\n    return x ** 2  # square\n",
    "Hello 世界! 你好\uff0c世界。🎉🚀 naïve café — done",
    "👩‍👩‍👧‍👦 family, 🇫🇷 flag, ∑∫√ math, 日本語のテキスト",
]


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def prompt(tokenizer):
    chat = [{"role": "user", "content": "Say something."}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(text, add_special_tokens=False)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(tokenizer, prompt, outputs, params):
    """Feed `outputs` one token at a time, taking a delta after each, as the engine would."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    deltas, stop = [], None
    for token_id in outputs:
        stop = detok.add(token_id)
        deltas.append(detok.take_delta())
        if stop is not None:
            break
    deltas.append(detok.take_delta(finished=True))
    return detok, deltas, stop


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_full_decode(tokenizer, prompt, text):
    outputs = [*encode(tokenizer, text), tokenizer.eos_token_id]
    detok, deltas, stop = stream(tokenizer, prompt, outputs, SamplingParams())
    assert stop is None
    assert "".join(deltas) == detok.text == tokenizer.decode(outputs, skip_special_tokens=True)
    assert detok.text == text
    # characters split over byte tokens are held until complete, never sent as U+FFFD
    assert all("\ufffd" not in d for d in deltas)


def test_special_tokens_kept_when_not_skipped(tokenizer, prompt):
    outputs = [*encode(tokenizer, "Hi there"), tokenizer.eos_token_id]
    params = SamplingParams(skip_special_tokens=False)
    detok, deltas, _ = stream(tokenizer, prompt, outputs, params)
    assert "".join(deltas) == tokenizer.decode(outputs, skip_special_tokens=False)
    assert detok.text.endswith(tokenizer.eos_token)


@pytest.mark.parametrize(
    ("text", "stop"),
    [
        ("Hello world, this is a test.", "o wor"),  # spans the "Hello" / " world" boundary
        ("Hello 世界和平 forever", "界和"),  # spans multi-byte characters split over tokens
        ("def f(x):\n    return x\n\nprint(1)", "\n\n"),
    ],
)
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_tokens(tokenizer, prompt, text, stop, include):
    outputs = encode(tokenizer, text)
    assert all(stop not in tokenizer.decode([t]) for t in outputs)  # no single token holds it
    params = SamplingParams(stop=("never", stop), include_stop_str_in_output=include)
    detok, deltas, matched = stream(tokenizer, prompt, outputs, params)
    cut = text.index(stop) + (len(stop) if include else 0)
    assert matched == stop == detok.stop_reason
    assert "".join(deltas) == detok.text == text[:cut]
    if not include:
        assert stop not in "".join(deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_stop_string_never_streamed(tokenizer, prompt, text):
    # every stop string is a substring of the text at a few positions: the earliest one wins
    stops = tuple(text[i : i + n] for i, n in [(len(text) // 2, 3), (len(text) // 3, 5)])
    detok, deltas, matched = stream(
        tokenizer, prompt, encode(tokenizer, text), SamplingParams(stop=stops)
    )
    first = min(text.index(s) for s in stops)
    assert detok.text == text[:first]
    assert "".join(deltas) == text[:first]
    assert matched in stops and text.index(matched) == first
    for s in stops:
        assert s not in "".join(deltas)


def test_possible_stop_prefix_is_held_back(tokenizer, prompt):
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams(stop=("STOP!",)))
    sent = ""
    for token_id in encode(tokenizer, "go ST"):
        assert detok.add(token_id) is None
        sent += detok.take_delta()
    assert sent == "go " and detok.text == "go ST"  # "ST" may begin "STOP!"
    for token_id in encode(tokenizer, "OP now"):  # "go STOP now": it did not
        assert detok.add(token_id) is None
        sent += detok.take_delta()
    assert sent == "go STOP now"
    for token_id in encode(tokenizer, " STO"):
        detok.add(token_id)
    assert detok.take_delta() == " "
    assert detok.take_delta(finished=True) == "STO"  # the output ended: nothing is held


def test_stop_strings_wait_for_min_tokens(tokenizer, prompt):
    outputs = encode(tokenizer, "a b a b a b")
    assert tokenizer.decode(outputs[:2]) == "a b"
    _, _, matched = stream(tokenizer, prompt, outputs, SamplingParams(stop=("b",)))
    assert matched == "b"
    params = SamplingParams(stop=("b",), min_tokens=2, max_tokens=16)
    detok, _, matched = stream(tokenizer, prompt, outputs, params)
    # as in vLLM, only a token after the first min_tokens ones can complete a stop string
    assert matched == "b"
    assert detok.text == "a b a "


@pytest.mark.parametrize("stops", [("world", "lo w"), ("lo w", "world")])
def test_earliest_stop_string_wins(tokenizer, prompt, stops):
    # both complete with the " world" token; "lo w" starts first whatever the list order
    params = SamplingParams(stop=stops)
    detok, _, matched = stream(tokenizer, prompt, encode(tokenizer, "Hello world"), params)
    assert (matched, detok.text) == ("lo w", "Hel")


def test_stop_string_ending_first_wins(tokenizer, prompt):
    # both complete with the " world" token: text arriving a character at a time would have
    # met "lo w" first, so it wins though "Hello world" starts earlier
    params = SamplingParams(stop=("Hello world", "lo w"))
    detok, _, matched = stream(tokenizer, prompt, encode(tokenizer, "Hello world"), params)
    assert (matched, detok.text) == ("lo w", "Hel")


@pytest.mark.parametrize("text", ["Straße über", "日本"])
def test_output_cut_inside_a_character_keeps_the_text_before_it(tokenizer, prompt, text):
    # a token holding a space and the first byte of a character: the output ends there
    ids = encode(tokenizer, " " + text)
    cut = next(i for i, t in enumerate(ids) if tokenizer.decode([t]) in (" \ufffd", "\ufffd"))
    outputs = ids[: cut + 1]
    detok, deltas, _ = stream(tokenizer, prompt, outputs, SamplingParams())
    decoded = tokenizer.decode(outputs)
    assert decoded.endswith("\ufffd")
    # every complete character (the space too), not the unfinished one
    assert "".join(deltas) == detok.text == decoded.rstrip("\ufffd")


def test_prompt_context_keeps_leading_space():
    # a SentencePiece-style decoder drops the first token's space unless the prompt precedes it
    vocab = {"<unk>": 0, "\u2581Hello": 1, "\u2581world": 2, "\u2581again": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    detok, deltas, _ = stream(tokenizer, [1], [2, 3], SamplingParams())
    assert "".join(deltas) == detok.text == " world again"
    assert tokenizer.decode([1, 2, 3]) == "Hello" + detok.text


def test_prompt_ending_inside_a_character(tokenizer):
    ids = encode(tokenizer, "Hello 世界 ok")
    split = next(i for i in range(1, len(ids)) if tokenizer.decode(ids[:i]).endswith("\ufffd"))
    prompt, outputs = ids[:split], ids[split:]
    detok, deltas, _ = stream(tokenizer, prompt, outputs, SamplingParams())
    # the prompt never leaks into the output; the orphan bytes decode as the tokenizer does
    assert "".join(deltas) == detok.text == tokenizer.decode(outputs)


def test_add_after_stop_is_refused(tokenizer, prompt):
    detok, _, matched = stream(
        tokenizer, prompt, encode(tokenizer, "one two three"), SamplingParams(stop=(" two",))
    )
    assert matched == " two"
    with pytest.raises(RuntimeError):
        detok.add(encode(tokenizer, " four")[0])
