"""Benchmark models (random weights, built offline) and their analytic FLOP counts.

`tiny` is the test suite's toy; `small` (hidden 768, 12 layers: 79M parameters in its layers
and vision side, plus 49M in a Llama-sized 32,000-token embedding and head) is big enough that
matrix multiplies, not Python, dominate a CPU forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig

from trol import TroLConfig, TroLForConditionalGeneration, TroLProcessor
from trol.processing import ImageSettings
from trol.tiny import SPECIAL_TOKENS, build_tokenizer, vision_config


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    image_size: int  # square input of the vision tower
    patch: int
    vision_hidden: int
    vision_layers: int
    # None: the tokenizer's few hundred tokens. A real LLM's head (32k+ tokens) is a large
    # share of each decode step, and so lowers traversal's relative cost there.
    vocab: int | None = None


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                  image_size=32, patch=8, vision_hidden=32, vision_layers=2),
    "small": Shape(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048,
                   image_size=112, patch=14, vision_hidden=256, vision_layers=4, vocab=32000),
}


def build_model(size: str, traversal: str = "prefill", seed: int = 0,
                eos_reachable: bool = True) -> tuple[TroLForConditionalGeneration, TroLProcessor]:
    """A random TroL of the named shape (fp32, eval mode) and its processor.

    With eos_reachable=False the end-of-turn tokens get an all-zero LM-head row: their logit
    is exactly 0 while the best of the other few hundred random logits is positive, so
    greedy decoding always runs to max_new_tokens and every variant generates equal tokens.
    Token ids past the tokenizer's vocabulary (small's 32k head) decode to nothing: captions
    may be empty, their token counts are real.
    """
    shape = SHAPES[size]
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = LlamaConfig(
        vocab_size=shape.vocab or len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["<|end|>"],
    )
    vision = vision_config("clip", image_size=shape.image_size, patch_size=shape.patch, hidden=shape.vision_hidden)
    vision.num_hidden_layers = shape.vision_layers
    config = TroLConfig(text_config=text, vision_config=vision, image_token_id=ids["<image>"], traversal=traversal)
    torch.manual_seed(seed)
    model = TroLForConditionalGeneration(config).eval()
    eos = [ids["<|end|>"], ids["</s>"]]
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids["<pad>"],
                                               bos_token_id=ids["<s>"], max_new_tokens=16, do_sample=False)
    if not eos_reachable:
        with torch.no_grad():
            model.get_output_embeddings().weight[eos] = 0.0
    processor = TroLProcessor(tokenizer, image_seq_length=config.image_seq_length,
                              image=ImageSettings(size=shape.image_size, mean=[0.5] * 3, std=[0.5] * 3))
    return model, processor


def save_model(size: str, folder: Path, traversal: str = "prefill", seed: int = 0, eos_reachable: bool = True) -> Path:
    """The same model as a folder the jobs load (`model:` / `base_model:`)."""
    model, processor = build_model(size, traversal, seed, eos_reachable)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- analytic FLOPs (multiply-add = 2 FLOPs; matmuls and attention only, norms ignored) ----

def layer_matmul_flops(text: LlamaConfig) -> int:
    """Per token, one pass through one decoder layer's weight matrices."""
    d, head_dim = text.hidden_size, text.hidden_size // text.num_attention_heads
    q_out, kv_out = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    attention = d * q_out + 2 * d * kv_out + q_out * d
    mlp = 3 * d * text.intermediate_size
    return 2 * (attention + mlp)


def attention_flops(text: LlamaConfig, query_tokens: int, context_before: int) -> int:
    """Scores and weighted values for `query_tokens` new tokens with causal masking: token i
    attends to context_before + i + 1 keys."""
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    keys = query_tokens * context_before + query_tokens * (query_tokens + 1) // 2
    return 2 * 2 * width * keys


def mixer_flops(text: LlamaConfig) -> int:
    """Gate (a d-vector dot product) and the blend (1 − s)·h1 + s·h2, per token per layer."""
    return 2 * text.hidden_size + 3 * text.hidden_size


def forward_flops(text: LlamaConfig, batch: int, new_tokens: int, context_before: int, traverses: bool,
                  logits_tokens: int) -> int:
    """One forward over `new_tokens` per row after `context_before` cached tokens. A
    traversed layer runs twice (the second pass sees the same context) plus its mixer."""
    per_pass = new_tokens * layer_matmul_flops(text) + attention_flops(text, new_tokens, context_before)
    layers = text.num_hidden_layers * (2 * per_pass + new_tokens * mixer_flops(text) if traverses else per_pass)
    head = logits_tokens * 2 * text.hidden_size * text.vocab_size
    return batch * (layers + head)


def prefill_flops(text: LlamaConfig, batch: int, tokens: int, mode: str) -> int:
    """Prefill as generate runs it: logits for the last position only. `prefill` and `full`
    both traverse a multi-token pass."""
    return forward_flops(text, batch, tokens, 0, traverses=mode != "off", logits_tokens=1)


def decode_flops(text: LlamaConfig, batch: int, context: int, mode: str) -> int:
    """One cached decode step: only `full` traverses a one-token step."""
    return forward_flops(text, batch, 1, context, traverses=mode == "full", logits_tokens=1)
