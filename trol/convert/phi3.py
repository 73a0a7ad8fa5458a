"""TroL-3.8B: Phi-3-mini + InternViT-300M (448-px tiles, pixel shuffle 0.5, 256 tokens per tile).

The LLM keys are already transformers Phi-3 names (only our `.layer.` wrapper segment is
added). InternViT maps onto transformers' InternVL vision model: the packed `attn.qkv` is
split into q/k/v in [q; k; v] row order, `ls1/ls2` are the layer scales `lambda_1/2`,
`norm1/norm2` the pre-attention / pre-MLP norms; the tower has no final norm.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import InternVLVisionConfig, Phi3Config
from transformers.activations import ACT2FN

from ..processing import ChatFormat, ImageSettings
from .checkpoint import ConversionError
from .config_keys import ConfigSection
from .internlm2 import RELEASED_SYSTEM

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHAT = ChatFormat(
    system_prefix="<|system|>\n",
    user_prefix="<|user|>\n",
    assistant_prefix="<|assistant|>\n",
    turn_suffix="<|end|>\n",
    system=RELEASED_SYSTEM,
)
_VIT_LAYER = {"attn.proj": "attention.projection_layer", "attn.q_norm": "attention.q_norm",
              "attn.k_norm": "attention.k_norm", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
              "norm1": "layernorm_before", "norm2": "layernorm_after"}
# The release's own preprocessing: 1-6 tiles by aspect ratio plus a thumbnail, whatever the
# config's min/max_dynamic_patch or use_thumbnail say (its code never reads them).
RELEASED_TILING = {"min_tiles": 1, "max_tiles": 6, "thumbnail": True}


def is_phi3(config: dict, names: set[str]) -> bool:
    return "llm_config" in config and "vision_config" in config


def _rope(keys: ConfigSection, head_dim: int, max_positions: int, original: int) -> dict:
    rope = {"rope_type": "default", "rope_theta": float(keys.take("rope_theta", 10000.0))}
    scaling = keys.take("rope_scaling", None)
    if not scaling:
        return rope
    kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    if kind not in ("su", "longrope"):
        raise ConversionError(f"config.json {keys.path('rope_scaling')} type {kind!r} is not supported: the converter "
                              "reproduces Phi-3's longrope (\"su\") with short and long factors")
    factors = {name: scaling.get(name) for name in ("short_factor", "long_factor")}
    for name, values in factors.items():
        if not isinstance(values, list) or len(values) != head_dim // 2:
            raise ConversionError(f"config.json {keys.path('rope_scaling')}.{name} must list {head_dim // 2} numbers "
                                  f"(head_dim / 2), got {values!r}")
    extra = set(scaling) - {"type", "rope_type", "short_factor", "long_factor"}
    if extra:
        raise ConversionError(f"config.json {keys.path('rope_scaling')} holds {sorted(extra)}: not part of the "
                              "release's longrope, which the converter reproduces")
    # Long factors apply past original_max_position_embeddings; cos/sin are scaled by
    # sqrt(1 + ln(s) / ln(original)) with s = max_position_embeddings / original, as released.
    rope.update(rope_type="longrope", **factors, factor=max_positions / original,
                original_max_position_embeddings=original)
    return rope


def text_config(llm: dict) -> tuple[Phi3Config, list[str]]:
    """Phi-3's own fields of `llm_config`, and the keys ignored."""
    keys = ConfigSection(llm, "llm_config.")
    if keys.take("model_type", "phi3") != "phi3":
        raise ConversionError(f"config.json llm_config.model_type={llm['model_type']!r}: TroL-3.8B's LLM is phi3")
    hidden, heads = keys.take("hidden_size"), keys.take("num_attention_heads")
    max_positions = keys.take("max_position_embeddings", 4096)
    original = keys.take("original_max_position_embeddings", 4096)
    hidden_act = keys.take("hidden_act", "silu")
    if hidden_act not in ACT2FN:
        raise ConversionError(f"config.json llm_config.hidden_act={hidden_act!r} is not an activation transformers knows")
    text = Phi3Config(
        vocab_size=keys.take("vocab_size"), hidden_size=hidden, intermediate_size=keys.take("intermediate_size"),
        num_hidden_layers=keys.take("num_hidden_layers"), num_attention_heads=heads,
        num_key_value_heads=keys.take("num_key_value_heads", None) or heads,
        # Dropout never acts in evaluation; kept so fine-tuning sees the release's rates.
        resid_pdrop=keys.take("resid_pdrop", 0.0), embd_pdrop=keys.take("embd_pdrop", 0.0),
        attention_dropout=keys.take("attention_dropout", 0.0),
        hidden_act=hidden_act, max_position_embeddings=max_positions, original_max_position_embeddings=original,
        initializer_range=keys.take("initializer_range", 0.02), rms_norm_eps=keys.take("rms_norm_eps", 1e-5),
        rope_parameters=_rope(keys, hidden // heads, max_positions, original),
        bos_token_id=keys.take("bos_token_id", 1), eos_token_id=keys.take("eos_token_id", 32000),
        pad_token_id=keys.take("pad_token_id", 32000), sliding_window=keys.take("sliding_window", None),
        tie_word_embeddings=False,
    )
    keys.fixed("tie_word_embeddings", False, "the released lm_head is its own matrix")
    keys.ignore("use_cache", "attn_implementation")
    return text, keys.finish()


def vision_config(vit: dict, image_size: int) -> tuple[InternVLVisionConfig, list[str]]:
    """InternViT's fields of `vision_config` on transformers' InternVL vision model."""
    keys = ConfigSection(vit, "vision_config.")
    if keys.take("model_type", "intern_vit_6b") != "intern_vit_6b":
        raise ConversionError(f"config.json vision_config.model_type={vit['model_type']!r}: TroL-3.8B's vision "
                              "tower is InternViT (intern_vit_6b)")
    norm = keys.take("norm_type", "rms_norm")
    if norm not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"config.json vision_config.norm_type={norm!r}: expected layer_norm or rms_norm")
    config = InternVLVisionConfig(
        hidden_size=keys.take("hidden_size"),
        intermediate_size=keys.take("intermediate_size"),
        num_hidden_layers=keys.take("num_hidden_layers"),
        num_attention_heads=keys.take("num_attention_heads"),
        image_size=image_size,
        patch_size=keys.take("patch_size"),
        attention_bias=bool(keys.take("qkv_bias", False)),
        use_qk_norm=bool(keys.take("qk_normalization", True)),
        norm_type=norm,
        layer_norm_eps=keys.take("layer_norm_eps", 1e-6),
        hidden_act=keys.take("hidden_act", "gelu"),
        use_mean_pooling=True,  # → no final norm, as InternViT has none
    )
    keys.take("image_size", None)  # force_image_size, when set, is the size the release runs at
    keys.fixed("num_channels", 3, "the release feeds RGB tiles")
    # The release runs the tower in eval mode, always (also while training the rest), so its
    # dropout and drop-path rates never act; the initializers only matter for fresh weights
    # (the layer scales ls1/ls2 are loaded); use_flash_attn picks a kernel; a vision tower
    # has no word embeddings to tie and no tokens of its own.
    keys.ignore("dropout", "attention_dropout", "drop_path_rate", "initializer_range", "initializer_factor",
                "use_flash_attn", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    return config, keys.finish()


def plan(src: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    keys = ConfigSection(config)
    vit = keys.take("vision_config")
    image_size = keys.take("force_image_size", None) or vit.get("image_size")
    ratio = keys.take("downsample_ratio", 0.5)
    keys.fixed("select_layer", -1, "the release's code always takes the vision tower's last layer")
    keys.fixed("use_backbone_lora", 0, "a LoRA on the vision tower is not part of the release")
    keys.fixed("use_llm_lora", 0, "a LoRA on the LLM is not part of the release")
    # The release's code hard-codes its preprocessing (1-6 tiles + thumbnail at 448 px, the v2
    # pixel-shuffle order) and its Phi-3 prompt, whatever these say; the top-level model has no
    # word embeddings of its own to tie (the LLM's tie flag is llm_config's).
    keys.ignore("template", "ps_version", "dynamic_image_size", "use_thumbnail", "min_dynamic_patch",
                "max_dynamic_patch", "pad2square", "hidden_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "pad_token_id")
    text, llm_ignored = text_config(keys.take("llm_config"))
    vision, vit_ignored = vision_config(vit, image_size)
    ignored = keys.finish() + llm_ignored + vit_ignored
    patch = vit["patch_size"]  # InternVLVisionConfig stores (h, w); the release's config one int
    tokens = int((image_size // patch) ** 2 * ratio**2)
    return {
        "text_config": text,
        "vision_config": vision,
        "ignored_config_keys": ignored,
        "plora": None,
        "projector": "ln_mlp2x_gelu",
        "vision_feature_layer": -1,
        "pixel_shuffle_ratio": ratio,
        "image": ImageSettings(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample="bicubic",
                               tiling=dict(RELEASED_TILING)),
        "image_seq_length": tokens,
        "chat": CHAT,
        "image_token": "<IMG_CONTEXT>",
        "image_placeholder": "<image>",
        "image_start": "<img>",
        "image_end": "</img>",
        "end_of_turn": "<|end|>",
        "suppress_image_token": False,
    }


def tensor_mapper(config: dict, shapes: dict[str, tuple[int, ...]], tower_prefix: str):
    hidden = config["vision_config"]["hidden_size"]

    def mapper(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if name.startswith("language_model."):
            rest = re.sub(r"^model\.layers\.(\d+)\.", r"model.layers.\1.layer.", name[len("language_model."):])
            return [("language_model." + rest, t)]
        if (m := re.match(r"^vision_proj\.(0|1|3)\.(weight|bias)$", name)) is not None:
            return [(f"vision.projector.{ {'0': 'norm', '1': 'linear_1', '3': 'linear_2'}[m.group(1)] }.{m.group(2)}", t)]
        embed = {"vision_model.embeddings.class_embedding": "embeddings.cls_token",
                 "vision_model.embeddings.position_embedding": "embeddings.position_embeddings",
                 "vision_model.embeddings.patch_embedding.weight": "embeddings.patch_embeddings.projection.weight",
                 "vision_model.embeddings.patch_embedding.bias": "embeddings.patch_embeddings.projection.bias"}
        if name in embed:
            return [(tower_prefix + embed[name], t)]
        m = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
        n = re.match(r"^vision_model\.encoder\.layers\.(\d+)\.(ls1|ls2)$", name)
        if n is not None:
            return [(f"{tower_prefix}encoder.layer.{n.group(1)}.lambda_{n.group(2)[-1]}", t)]
        if m is not None:
            layer, module, kind = m.groups()
            out = f"{tower_prefix}encoder.layer.{layer}."
            if module == "attn.qkv":
                q, k, v = t.split(hidden, dim=0)
                return [(f"{out}attention.{p}.{kind}", x) for p, x in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))]
            if module in _VIT_LAYER:
                return [(f"{out}{_VIT_LAYER[module]}.{kind}", t)]
        raise ConversionError(f"source tensor {name} has no place in a TroL model; is this a released TroL-3.8B?")

    return mapper
