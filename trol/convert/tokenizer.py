"""Turn TroL's InternLM2 SentencePiece tokenizer into a transformers-native fast tokenizer.

The released TroL checkpoints ship `tokenizer.model` (SentencePiece BPE) for InternLM2's custom
slow tokenizer class, which needs `trust_remote_code`. That tokenizer splits text on the added
tokens of `tokenizer_config.json` and runs `SentencePieceProcessor.encode` on every remaining
chunk, so the dummy prefix and the normalizer apply per chunk (transformers' "legacy" mode).
The result here encodes the same ids, saves with `save_pretrained` and loads back with
`AutoTokenizer.from_pretrained` without remote code or sentencepiece.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf

SENTENCEPIECE_BPE = 2  # TrainerSpec.ModelType.BPE in sentencepiece_model.proto


def _read_sentencepiece_model(model_path: Path) -> Any:
    """Parse the ModelProto with protobuf alone, so converting never needs sentencepiece."""
    if not model_path.is_file():
        raise FileNotFoundError(
            f"SentencePiece model {model_path} not found: pass the checkpoint's `tokenizer.model` "
            "(e.g. download it with huggingface_hub.hf_hub_download(repo_id, 'tokenizer.model'))."
        )
    try:
        model_pb2 = import_protobuf()
    except ImportError as error:
        raise ImportError(f"Reading {model_path} needs protobuf: `pip install protobuf`.") from error
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_path.read_bytes())
    except Exception as error:  # protobuf raises DecodeError, but its module path varies by backend
        raise ValueError(f"{model_path} is not a SentencePiece model (ModelProto failed to parse); "
                         "pass the checkpoint's tokenizer.model.") from error
    if not proto.pieces:
        raise ValueError(f"{model_path} has no pieces: it is not a usable SentencePiece model.")
    return proto


def _added_tokens(tokenizer_config: dict[str, Any], sp_vocab_size: int) -> list[tuple[int, AddedToken]]:
    """The config's `added_tokens_decoder`, sorted by id. Ids past the sp vocab must be contiguous,
    because the backend can only append added tokens at the next free id."""
    entries = tokenizer_config.get("added_tokens_decoder") or {}
    added = []
    for raw_id, entry in entries.items():
        content = entry["content"] if isinstance(entry, dict) else str(entry)
        flags = entry if isinstance(entry, dict) else {}
        token = AddedToken(
            content,
            single_word=flags.get("single_word", False),
            lstrip=flags.get("lstrip", False),
            rstrip=flags.get("rstrip", False),
            # The slow tokenizer matches added tokens in the raw text, before SentencePiece normalizes.
            normalized=False,
            special=flags.get("special", True),
        )
        added.append((int(raw_id), token))
    added.sort(key=lambda item: item[0])
    next_free_id = sp_vocab_size
    for token_id, token in added:
        if token_id >= sp_vocab_size:
            if token_id != next_free_id:
                raise ValueError(
                    f"tokenizer_config['added_tokens_decoder'] gives {token.content!r} id {token_id}, but ids "
                    f"past the SentencePiece vocab ({sp_vocab_size}) must be contiguous; renumber it "
                    f"{next_free_id}."
                )
            next_free_id += 1
    return added


def tokenizer_from_sentencepiece(
    model_file: str | os.PathLike, tokenizer_config: dict[str, Any] | None = None
) -> PreTrainedTokenizerFast:
    """Build a fast tokenizer that encodes like InternLM2's slow tokenizer.

    `tokenizer_config` is the checkpoint's parsed `tokenizer_config.json`; its `added_tokens_decoder`
    keeps its ids, `bos_token`/`eos_token`/`unk_token`/`pad_token` and `add_bos_token` are honoured.
    Without a pad token the official TroL code pads with eos, so we do too.
    """
    model_path = Path(model_file)
    proto = _read_sentencepiece_model(model_path)
    if proto.trainer_spec.model_type != SENTENCEPIECE_BPE:
        raise ValueError(f"{model_path} is not a BPE SentencePiece model (trainer_spec.model_type="
                         f"{proto.trainer_spec.model_type}); InternLM2/TroL tokenizers are BPE.")
    config = dict(tokenizer_config or {})
    sp_vocab = {piece.piece: piece_id for piece_id, piece in enumerate(proto.pieces)}
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, sp_vocab, legacy=True)

    added = _added_tokens(config, len(sp_vocab))
    # One at a time, in id order: an in-vocab token keeps its sp id, a new one takes the next id.
    for token_id, token in added:
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        if backend.token_to_id(token.content) != token_id:
            raise ValueError(
                f"tokenizer_config['added_tokens_decoder'] gives {token.content!r} id {token_id}, but "
                f"{model_path} maps it to {backend.token_to_id(token.content)}."
            )

    def token_text(key: str, default: str) -> str:
        value = config.get(key) or default
        return value["content"] if isinstance(value, dict) else str(value)

    unk_default = proto.pieces[proto.trainer_spec.unk_id].piece if proto.trainer_spec.unk_id >= 0 else "<unk>"
    bos, eos = token_text("bos_token", "<s>"), token_text("eos_token", "</s>")
    named = {"bos_token": bos, "eos_token": eos, "unk_token": token_text("unk_token", unk_default),
             "pad_token": token_text("pad_token", eos)}
    for key, content in named.items():
        # Checked before construction: transformers would silently append a missing one as a new id.
        if backend.token_to_id(content) is None:
            raise ValueError(f"{key} {content!r} is neither a piece of {model_path} nor in "
                             "tokenizer_config['added_tokens_decoder']; add it there.")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **named,
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=bool(config.get("add_eos_token", False)),
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        model_max_length=config.get("model_max_length", int(1e30)),
        padding_side=config.get("padding_side", "right"),
    )
    return tokenizer
