"""Token bytes for byte-level BPE (the real SmolLM2 tokenizer) and SentencePiece byte fallback."""

from __future__ import annotations

import pytest
from conftest import smollm2_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from runtime.token_bytes import token_bytes

TEXTS = [
    "Hello world",
    "Hello 世界! über 🎉",
    "naïve café “quoted” — 日本語, 👩‍👩‍👧‍👦 🇫🇷",
]


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def byte_fallback():
    """Llama 2 style: '▁' for a space, and bytes no piece covers as tokens '<0xNN>'."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab |= {f"<0x{b:02X}>": 3 + b for b in range(256)}
    pieces = ["▁", "H", "e", "l", "o", "w", "r", "d", "ü", "b", "!", "▁H", "ll", "▁w"]
    vocab |= {piece: 259 + i for i, piece in enumerate(pieces)}
    merges = [("▁", "H"), ("l", "l"), ("▁", "w")]
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def joined(tokenizer, text: str) -> bytes:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return b"".join(token_bytes(tokenizer, t) for t in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_tokens_join_to_the_utf8(smollm2, text):
    assert joined(smollm2, text) == text.encode()


def test_byte_level_every_token_decodes_as_its_bytes(smollm2):
    backend = smollm2.backend_tokenizer
    ids = range(backend.get_vocab_size(with_added_tokens=True))
    alone = backend.decode_batch([[t] for t in ids], skip_special_tokens=False)
    assert [token_bytes(smollm2, t).decode("utf-8", "replace") for t in ids] == alone
    # a character split over tokens: each has part of its bytes
    ids = smollm2.encode("界", add_special_tokens=False)
    assert [len(token_bytes(smollm2, t)) for t in ids] == [1, 1, 1]


def test_special_tokens_are_their_text_unless_skipped(smollm2, byte_fallback):
    for tokenizer, token in [(smollm2, "<|im_end|>"), (byte_fallback, "</s>")]:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert token_bytes(tokenizer, token_id) == token.encode()
        assert token_bytes(tokenizer, token_id, skip_special_tokens=True) == b""
    assert token_bytes(smollm2, 10**6) == b""  # not in the vocabulary


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_tokens_join_to_the_utf8(byte_fallback, text):
    # the normalizer puts a '▁' (a space) before the text; decoding strips it
    assert joined(byte_fallback, text) == b" " + text.encode()
    assert byte_fallback.decode(byte_fallback.encode(text, add_special_tokens=False)) == text


def test_byte_fallback_pieces_and_bytes(byte_fallback):
    ids = byte_fallback.encode("Hello 世 ü", add_special_tokens=False)
    tokens = byte_fallback.convert_ids_to_tokens(ids)
    assert tokens == ["▁H", "e", "ll", "o", "▁", "<0xE4>", "<0xB8>", "<0x96>", "▁", "ü"]
    got = [token_bytes(byte_fallback, t) for t in ids]
    assert got == [b" H", b"e", b"ll", b"o", b" ", b"\xe4", b"\xb8", b"\x96", b" ", "ü".encode()]


def test_other_decoders_fall_back_to_the_token_decoded_alone():
    vocab = {"<unk>": 0, "hello</w>": 1, "wör": 2, "ld</w>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.BPEDecoder(suffix="</w>")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    assert [token_bytes(tokenizer, t) for t in (1, 2, 3)] == [b"hello", "wör".encode(), b"ld"]
