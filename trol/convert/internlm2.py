"""TroL-1.8B / TroL-7B: InternLM2 (XComposer2 form, partial LoRA everywhere) + CLIP-L/14 at 490 px.

InternLM2 becomes a transformers Llama decoder:
- packed `wqkv` rows are grouped per kv head j as [q heads of group j, k_j, v_j]; they are
  split into q_proj / k_proj / v_proj (weights, biases and the partial-LoRA B alike); the
  shared partial-LoRA A of wqkv is given to each of the three (same function);
- `w1`/`w3`/`w2` are gate/up/down, `attention_norm`/`ffn_norm` the two RMSNorms;
- the embedding has one more row than the LM head (the `<image>` token, always overwritten by
  image features): the head gets a zero row for it and generation suppresses that token.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, LlamaConfig
from transformers.activations import ACT2FN

from ..processing import ChatFormat, ImageSettings
from .checkpoint import ConversionError
from .config_keys import ConfigSection

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The system turn the released models were trained and evaluated with.
RELEASED_SYSTEM = (
    "You are AI model created by Byung-Kwan Lee, Ph.D. candidate, KAIST EE, of which AI model name is "
    "TroL (Traversal of Layers). You must give helpful, detailed, and polite answers to the user's questions"
)
CHAT = ChatFormat(
    system_prefix="[UNUSED_TOKEN_146]system\n",
    user_prefix="[UNUSED_TOKEN_146]user\n",
    assistant_prefix="[UNUSED_TOKEN_146]assistant\n",
    turn_suffix="[UNUSED_TOKEN_145]\n",
    system=RELEASED_SYSTEM,
)
_LINEARS = {"attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj",
            "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj"}
_ADAPTER_PARTS = {"ffn": "base", "lora_A": "plora_A", "Plora_A": "plora_A", "lora_B": "plora_B", "Plora_B": "plora_B"}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def is_internlm2(config: dict, names: set[str]) -> bool:
    return "model.tok_embeddings.weight" in names or config.get("model_type") == "internlm2"


def text_config(config: dict, embedding_rows: int, head_rows: int) -> tuple[LlamaConfig, list[str]]:
    """The Llama decoder config for InternLM2's fields, and the config.json keys ignored.
    Defaults are those of the release's InternLM2Config for keys a hand-written file omits."""
    keys = ConfigSection(config)
    heads = keys.take("num_attention_heads")
    vocab = keys.take("vocab_size", head_rows)
    if vocab != head_rows:
        raise ConversionError(f"config.json vocab_size={vocab}, but output.weight has {head_rows} rows")
    rope = {"rope_type": "default", "rope_theta": float(keys.take("rope_theta", 10000.0))}
    scaling = keys.take("rope_scaling", None)
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
        factor = scaling.get("factor") if isinstance(scaling, dict) else None
        if kind != "dynamic" or not isinstance(factor, (int, float)) or factor < 1:
            raise ConversionError(f"config.json rope_scaling={scaling!r} is not supported: the release's InternLM2 "
                                  "runs only null or {\"type\": \"dynamic\", \"factor\": >= 1}")
        rope.update(rope_type="dynamic", factor=float(factor))
    hidden_act = keys.take("hidden_act", "silu")
    if hidden_act not in ACT2FN:
        raise ConversionError(f"config.json hidden_act={hidden_act!r} is not an activation transformers knows")
    bias = bool(keys.take("bias", True))
    eos = keys.take("eos_token_id", 2)
    text = LlamaConfig(
        vocab_size=embedding_rows,
        hidden_size=keys.take("hidden_size"),
        intermediate_size=keys.take("intermediate_size"),
        num_hidden_layers=keys.take("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=keys.take("num_key_value_heads", None) or heads,
        head_dim=keys.take("hidden_size") // heads,
        hidden_act=hidden_act,
        max_position_embeddings=keys.take("max_position_embeddings", 2048),
        rms_norm_eps=keys.take("rms_norm_eps", 1e-6),
        initializer_range=keys.take("initializer_range", 0.02),
        rope_parameters=rope,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=False,
        pad_token_id=eos,  # the release pads with end-of-text
        bos_token_id=keys.take("bos_token_id", 1),
        eos_token_id=eos,
    )
    keys.fixed("tie_word_embeddings", False, "the released LM head (output.weight) is its own matrix")
    # use_cache only decides whether generate() keeps a KV cache; the release's
    # attn_implementation choice and pad_token_id (the release pads with eos) do not change numbers.
    keys.ignore("use_cache", "attn_implementation", "pad_token_id")
    return text, keys.finish()


def vision_config(position_rows: int, shapes: dict[str, tuple[int, ...]]) -> CLIPVisionConfig:
    """CLIP-L/14 with positions for a 35×35 grid (490 px); sizes read off the weights."""
    prefix = "vit.vision_tower.vision_model."
    hidden = shapes[prefix + "embeddings.class_embedding"][0]
    patch = shapes[prefix + "embeddings.patch_embedding.weight"][-1]
    layers = 1 + max(int(m.group(1)) for n in shapes if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n)))
    grid = round((position_rows - 1) ** 0.5)
    if grid * grid + 1 != position_rows:
        raise ConversionError(f"{prefix}embeddings.position_embedding has {position_rows} rows: not a square grid + CLS")
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=shapes[prefix + "encoder.layers.0.mlp.fc1.weight"][0],
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def plan(src: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Everything the converted folder needs besides the tensors."""
    embedding_rows = shapes["model.tok_embeddings.weight"][0]
    lora_a = next((shapes[n] for n in shapes if n.endswith("attention.wqkv.lora_A.weight") or n.endswith("attention.wqkv.Plora_A.weight")), None)
    if lora_a is None:
        raise ConversionError("no attention.wqkv.lora_A weights: this does not look like a released TroL InternLM2 checkpoint")
    rank = lora_a[0]
    vision = vision_config(shapes["vit.vision_tower.vision_model.embeddings.position_embedding.weight"][0], shapes)
    grid = vision.image_size // vision.patch_size
    text, ignored = text_config(config, embedding_rows, shapes["output.weight"][0])
    return {
        "text_config": text,
        "ignored_config_keys": ignored,
        "vision_config": vision,
        "plora": {"r": rank, "alpha": float(rank)},  # the release scales by alpha/r = 256/256
        "projector": "mlp2x_gelu",
        "vision_feature_layer": -1,
        "pixel_shuffle_ratio": None,
        "image": ImageSettings(size=vision.image_size, mean=CLIP_MEAN, std=CLIP_STD, resample="bicubic"),
        "image_seq_length": grid * grid,
        "chat": CHAT,
        "image_token": "<image>",
        "image_placeholder": "<image>",
        "image_start": "",
        "image_end": "",
        "end_of_turn": "[UNUSED_TOKEN_145]",
        "suppress_image_token": True,  # its LM-head row is the zero row added for it
    }


def tensor_mapper(config: dict, shapes: dict[str, tuple[int, ...]], tower_prefix: str):
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim, group = hidden // heads, heads // kv_heads
    embedding_rows = shapes["model.tok_embeddings.weight"][0]

    def split_qkv(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grouped = t.reshape(kv_heads, group + 2, head_dim, *t.shape[1:])
        q = grouped[:, :group].reshape(heads * head_dim, *t.shape[1:])
        return q, grouped[:, group].reshape(kv_heads * head_dim, *t.shape[1:]), grouped[:, group + 1].reshape(kv_heads * head_dim, *t.shape[1:])

    def map_layer(idx: str, rest: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        out = f"language_model.model.layers.{idx}.layer."
        if rest == "attention_norm.weight":
            return [(out + "input_layernorm.weight", t)]
        if rest == "ffn_norm.weight":
            return [(out + "post_attention_layernorm.weight", t)]
        module, part, kind = rest.rsplit(".", 2)  # e.g. attention.wqkv / lora_B / weight
        if part not in _ADAPTER_PARTS:
            raise ConversionError(f"model.layers.{idx}.{rest}: unknown tensor")
        ours = _ADAPTER_PARTS[part]
        if module == "attention.wqkv":
            names = [f"{out}self_attn.{p}.{ours}.{kind}" for p in ("q_proj", "k_proj", "v_proj")]
            if ours == "plora_A":  # one A shared by q/k/v in the release: each gets it
                return [(n, t.clone()) for n in names]
            return list(zip(names, split_qkv(t)))
        if module in _LINEARS:
            return [(f"{out}{_LINEARS[module]}.{ours}.{kind}", t)]
        raise ConversionError(f"model.layers.{idx}.{rest}: unknown tensor")

    def mapper(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name == "model.tok_embeddings.weight":
            return [("language_model.model.embed_tokens.weight", t)]
        if name == "model.norm.weight":
            return [("language_model.model.norm.weight", t)]
        if name == "output.weight":
            pad = t.new_zeros(embedding_rows - t.shape[0], t.shape[1])  # the <image> row: never a prediction
            return [("language_model.lm_head.weight", torch.cat([t, pad]))]
        if (m := _LAYER.match(name)) is not None:
            return map_layer(m.group(1), m.group(2), t)
        if name.startswith("vit.vision_tower.vision_model."):
            rest = name[len("vit.vision_tower.vision_model."):]
            if rest == "embeddings.position_ids":  # a derived buffer some transformers versions saved
                if not torch.equal(t.flatten(), torch.arange(t.numel(), dtype=t.dtype)):
                    raise ConversionError(f"{name} is not 0..n-1")
                return []
            return [(tower_prefix + rest, t)]
        if (m := re.match(r"^vision_proj\.(0|2)\.(weight|bias)$", name)) is not None:
            return [(f"vision.projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}", t)]
        raise ConversionError(f"source tensor {name} has no place in a TroL model; is this a released TroL-1.8B/7B?")

    return mapper
