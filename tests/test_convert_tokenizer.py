"""`tokenizer_from_sentencepiece` against SentencePiece itself, on tiny BPE models trained here.

The reference reproduces InternLM2's slow tokenizer: split the text on the added tokens of
`tokenizer_config.json`, emit each added token as its id, `SentencePieceProcessor.encode` every
other chunk (so the dummy prefix and the normalizer apply per chunk).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from trol.convert.tokenizer import tokenizer_from_sentencepiece

MARKERS = ["[UNUSED_TOKEN_146]", "[UNUSED_TOKEN_145]"]
SYSTEM_TEXT = "You are an AI assistant whose name is TroL.  Answer  briefly,\tkindly: 12345 ok? é 中文 🙂"
CHAT_PROMPT = (
    f"<s>[UNUSED_TOKEN_146]system\n{SYSTEM_TEXT}[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]user\n"
    "<image><image><image>\nDescribe the image.[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
)
PLAIN_TEXTS = [
    "Describe the image.",
    "hello  world   with  spaces",
    "  leading and trailing  ",
    " ",
    "",
    "line one\nline two\n\n  indented\n",
    "tab\tseparated\t\tvalues\t",
    "Café déjà vu, naïve façade",
    "中文 和 English 混合",
    "emoji 🙂🚀 and ⁵ ﬁ ｆｕｌｌ width",
    "digits 3.14159 and 2024-06-01 or 1,000,000",
    "▁already escaped ▁ marker",
    "   \n  \t  ",
]
WORDS = ("the image shows a cat dog person sitting on red blue chair table with two three many "
         "small large picture of in and near Describe describe answer question what where 12 345 6789 "
         "system user assistant You are an AI kindly briefly café naïve 中文 表 image: , . ? ! - \t").split(" ")
# (normalization rule, add_dummy_prefix, remove_extra_whitespaces); the second is InternLM2/Llama-like.
VARIANTS = [("nmt_nfkc", True, True), ("identity", True, False),
            ("identity", False, False), ("nmt_nfkc", False, True)]


def training_sentences(count: int = 400) -> list[str]:
    rng = random.Random(0)
    # Some double spaces, so whitespace-only pieces ("▁▁") exist where the normalizer keeps them.
    return [rng.choice(("  ", " ", " ", " ")).join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            for _ in range(count)]


def release_like_config(sp_vocab_size: int) -> dict:
    """Shaped like TroL's tokenizer_config.json: `<image>` is the one id past the sp vocab."""
    def entry(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    added = {0: "<unk>", 1: "<s>", 2: "</s>", 3: MARKERS[0], 4: MARKERS[1], sp_vocab_size: "<image>"}
    return {"added_tokens_decoder": {str(i): entry(c) for i, c in added.items()}, "bos_token": "<s>",
            "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None, "add_bos_token": True}


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"{v[0]}-prefix{int(v[1])}-strip{int(v[2])}")
def variant(request, tmp_path_factory) -> tuple[spm.SentencePieceProcessor, Path, dict]:
    rule, dummy_prefix, remove_spaces = request.param
    folder = tmp_path_factory.mktemp(f"spm-{rule}-{int(dummy_prefix)}-{int(remove_spaces)}")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_sentences()), model_prefix=str(folder / "tokenizer"),
        model_type="bpe", vocab_size=500, byte_fallback=True, character_coverage=1.0,
        user_defined_symbols=MARKERS, normalization_rule_name=rule, add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=remove_spaces, split_digits=True, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert processor.piece_to_id(MARKERS[0]) == 3  # user-defined pieces follow <unk>, <s>, </s>
    return processor, folder / "tokenizer.model", release_like_config(processor.get_piece_size())


def reference_ids(processor: spm.SentencePieceProcessor, config: dict, text: str) -> list[int]:
    added = {entry["content"]: int(i) for i, entry in config["added_tokens_decoder"].items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for chunk in re.split(pattern, text):
        ids += [added[chunk]] if chunk in added else processor.encode(chunk) if chunk else []
    return ids


def test_encodes_like_sentencepiece(variant):
    processor, model_file, config = variant
    tokenizer = tokenizer_from_sentencepiece(model_file, config)
    texts = [CHAT_PROMPT, *PLAIN_TEXTS, *(f"{MARKERS[0]}{t}{MARKERS[1]}<image>{t}" for t in PLAIN_TEXTS)]
    texts += training_sentences(60)
    for text in texts:
        expected = reference_ids(processor, config, text)
        assert tokenizer.encode(text, add_special_tokens=False) == expected, repr(text)
        assert tokenizer.encode(text) == [processor.bos_id(), *expected], repr(text)


def test_special_tokens_and_length(variant):
    processor, model_file, config = variant
    tokenizer = tokenizer_from_sentencepiece(model_file, config)
    assert len(tokenizer) == processor.get_piece_size() + 1
    assert tokenizer.convert_tokens_to_ids("<image>") == processor.get_piece_size()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the official code pads with eos
    assert tokenizer.convert_tokens_to_ids(MARKERS) == [3, 4]


def test_save_and_reload_without_sentencepiece_or_remote_code(variant, tmp_path):
    processor, model_file, config = variant
    tokenizer = tokenizer_from_sentencepiece(model_file, config)
    tokenizer.save_pretrained(tmp_path)
    assert not (tmp_path / "tokenizer.model").exists()
    reloaded = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)
    for text in [CHAT_PROMPT, *PLAIN_TEXTS]:
        assert reloaded.encode(text) == tokenizer.encode(text), repr(text)
        without_bos = tokenizer.encode(text, add_special_tokens=False)
        assert reloaded.encode(text, add_special_tokens=False) == without_bos, repr(text)
    assert (len(reloaded), reloaded.pad_token_id, reloaded.bos_token_id) == (len(tokenizer), 2, 1)


def test_decode_gives_text_back(variant):
    processor, model_file, config = variant
    tokenizer = tokenizer_from_sentencepiece(model_file, config)
    probe = "a  b ﬁ "
    normalizes = processor.decode(processor.encode(probe)) != probe
    for text in PLAIN_TEXTS:
        decoded = tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True)
        # SentencePiece's own round trip is the contract; it is the exact text unless the model normalizes.
        assert decoded == processor.decode(processor.encode(text)), repr(text)
        if not normalizes and "▁" not in text:  # a literal "▁" reads as a space in SentencePiece
            assert decoded == text


def test_reports_missing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        tokenizer_from_sentencepiece(tmp_path / "tokenizer.model")


def test_rejects_non_contiguous_added_ids(variant):
    processor, model_file, config = variant
    bad = json.loads(json.dumps(config))
    bad["added_tokens_decoder"][str(processor.get_piece_size() + 5)] = bad["added_tokens_decoder"].pop(
        str(processor.get_piece_size()))
    with pytest.raises(ValueError, match="added_tokens_decoder"):
        tokenizer_from_sentencepiece(model_file, bad)
