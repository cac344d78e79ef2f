"""Incremental detokenization against the tokenizer's own decode of the whole sequence: for a
byte-level BPE (the default model's: characters split across tokens) and a SentencePiece-style
Metaspace BPE trained here (its decode drops a leading space, which a first token must keep)."""

from __future__ import annotations

import random

import pytest
from conftest import DEFAULT_MODEL, REPO
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from trt_pipeline.runner.detok import IncrementalDecoder

TEXT = (REPO / "trt_pipeline" / "data" / "heldout.txt").read_text()
UNICODE = "ROMEO: café — naïve 東京 ünïcödé 🙂 end"


def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([TEXT, UNICODE], trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module", params=["byte-level", "metaspace"])
def tokenizer(request):
    if request.param == "byte-level":
        return AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    return metaspace_tokenizer()


def stream(tokenizer, prompt: list[int], out: list[int]) -> str:
    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    d = IncrementalDecoder(decode, prompt)
    return "".join(d.push(t, final=i == len(out) - 1) for i, t in enumerate(out))


def expected(tokenizer, prompt: list[int], out: list[int]) -> str:
    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    return decode(prompt + out)[len(decode(prompt)):]


def test_text_split_anywhere_streams_as_the_whole_decodes(tokenizer):
    for sample in [TEXT[i:i + 400] for i in range(0, 8000, 400)] + [UNICODE]:
        ids = tokenizer.encode(sample, add_special_tokens=False)
        for cut in (1, 2, 5, len(ids) // 2):
            assert stream(tokenizer, ids[:cut], ids[cut:]) == expected(tokenizer, ids[:cut],
                                                                       ids[cut:])


def test_random_ids_with_broken_characters_stream_as_the_whole_decodes(tokenizer):
    rng = random.Random(0)
    for _ in range(300):
        prompt = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 6))]
        out = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        assert stream(tokenizer, prompt, out) == expected(tokenizer, prompt, out)


def test_first_token_keeps_its_leading_space_under_metaspace():
    tok = metaspace_tokenizer()
    ids = tok.encode("Hello there my good lord", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if tok.convert_ids_to_tokens(ids[i])[0] == "▁")
    assert tok.decode(ids[cut:])[0] != " "  # decoding the output alone would lose the space
    assert stream(tok, ids[:cut], ids[cut:]).startswith(" ")


def test_a_character_split_across_tokens_is_held_until_complete():
    tok = AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))
    ids = tok.encode("東", add_special_tokens=False)
    assert len(ids) == 3  # a byte-level vocabulary trained on English: one token per byte
    d = IncrementalDecoder(lambda x: tok.decode(list(x)), tok.encode("A", add_special_tokens=False))
    assert [d.push(t) for t in ids] == ["", "", "東"]
