"""Tiny random TroL models for tests and demos, built offline (no downloads).

    python -m trol.tiny OUT_DIR [--backbone llama|qwen2|phi3] [--traversal off|prefill|full]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    Phi3Config,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

from .config import TroLConfig
from .modeling import TroLForConditionalGeneration
from .processing import ImageSettings, TroLProcessor

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>", "<|end|>"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Enough text for a byte-level BPE to learn common English pieces; the words our demos and
# tests caption with are whole tokens or short merges.
_CORPUS = [
    "Describe the image. What is in this picture? Write a short caption.",
    "a photo of a cat sitting on a chair near the window",
    "an astronaut in a white suit standing in front of a flag",
    "a black and white photo of a man with a camera",
    "a close up of a coffee cup on a wooden table",
    "a rocket on the launch pad under a blue sky",
    "coins of different sizes on a dark background",
    "a page of text with a grid of small letters",
    "a hand drawn picture of a horse and a house with a red door",
    "the quick brown fox jumps over the lazy dog",
] + [f"a handwritten digit {w}" for w in NUMBER_WORDS] * 3


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a small built-in corpus: any text encodes, nothing downloads."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        unk_token="<unk>",
        additional_special_tokens=["<image>", "<|user|>", "<|assistant|>", "</s>"],
    )


def text_config(backbone: str, vocab_size: int, hidden: int = 64, layers: int = 2):
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=7,
    )
    if backbone == "llama":
        return LlamaConfig(**common)
    if backbone == "qwen2":
        return Qwen2Config(**common)
    if backbone == "phi3":
        return Phi3Config(**common)
    raise ValueError(f"backbone={backbone!r}: choose llama, qwen2 or phi3")


def vision_config(kind: str = "clip", image_size: int = 32, patch_size: int = 8, hidden: int = 32):
    common = dict(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if kind == "clip":
        return CLIPVisionConfig(**common)
    if kind == "siglip":
        return SiglipVisionConfig(**common)
    raise ValueError(f"vision={kind!r}: choose clip or siglip")


def build_tiny(
    backbone: str = "llama",
    traversal: str = "full",
    vision: str = "clip",
    projector: str = "mlp2x_gelu",
    pixel_shuffle_ratio: float | None = None,
    image_size: int = 32,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> tuple[TroLForConditionalGeneration, TroLProcessor]:
    """A random-init tiny TroL model and its processor."""
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = text_config(backbone, len(tokenizer), hidden=hidden, layers=layers)
    text.pad_token_id, text.bos_token_id, text.eos_token_id = ids["<pad>"], ids["<s>"], ids["<|end|>"]
    config = TroLConfig(
        text_config=text,
        vision_config=vision_config(vision, image_size=image_size),
        image_token_id=ids["<image>"],
        projector=projector,
        pixel_shuffle_ratio=pixel_shuffle_ratio,
        traversal=traversal,
    )
    torch.manual_seed(seed)
    model = TroLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|end|>"], ids["</s>"]],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<s>"],
        max_new_tokens=16,
        do_sample=False,
    )
    processor = TroLProcessor(
        tokenizer,
        image_seq_length=config.image_seq_length,
        image=ImageSettings(size=image_size, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
    )
    return model, processor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random TroL model folder.")
    parser.add_argument("out_dir")
    parser.add_argument("--backbone", default="llama", choices=["llama", "qwen2", "phi3"])
    parser.add_argument("--traversal", default="full", choices=["off", "prefill", "full"])
    parser.add_argument("--vision", default="clip", choices=["clip", "siglip"])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, processor = build_tiny(
        args.backbone, args.traversal, args.vision, image_size=args.image_size,
        hidden=args.hidden, layers=args.layers, seed=args.seed,
    )
    out = Path(args.out_dir)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote tiny TroL ({args.backbone}, traversal={args.traversal}, {n_params:,} parameters) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
