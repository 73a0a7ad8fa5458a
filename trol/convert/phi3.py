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

from ..processing import ChatFormat, ImageSettings
from .checkpoint import ConversionError
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
_REMOTE_ONLY = {"architectures", "auto_map", "_name_or_path", "model_type", "transformers_version",
                "attn_implementation", "torch_dtype", "dtype", "use_cache"}


def is_phi3(config: dict, names: set[str]) -> bool:
    return "llm_config" in config and "vision_config" in config


def text_config(llm: dict) -> Phi3Config:
    fields = {k: v for k, v in llm.items() if k not in _REMOTE_ONLY}
    scaling = fields.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": float(fields.pop("rope_theta", 10000.0))}
    if scaling:
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in ("su", "longrope"):
            raise ConversionError(f"llm_config.rope_scaling type {kind!r}: only longrope ('su') is supported")
        rope.update(rope_type="longrope", short_factor=scaling["short_factor"], long_factor=scaling["long_factor"],
                    original_max_position_embeddings=fields.get("original_max_position_embeddings", 4096))
    return Phi3Config(**fields, rope_parameters=rope, tie_word_embeddings=False)


def vision_config(vit: dict, image_size: int) -> InternVLVisionConfig:
    if vit.get("norm_type", "layer_norm") not in ("layer_norm", "rms_norm"):
        raise ConversionError(f"vision_config.norm_type={vit.get('norm_type')!r}: expected layer_norm or rms_norm")
    return InternVLVisionConfig(
        hidden_size=vit["hidden_size"],
        intermediate_size=vit["intermediate_size"],
        num_hidden_layers=vit["num_hidden_layers"],
        num_attention_heads=vit["num_attention_heads"],
        image_size=image_size,
        patch_size=vit["patch_size"],
        attention_bias=bool(vit.get("qkv_bias", True)),
        use_qk_norm=bool(vit.get("qk_normalization", False)),
        norm_type=vit.get("norm_type", "layer_norm"),
        layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
        hidden_act=vit.get("hidden_act", "gelu"),
        layer_scale_init_value=vit.get("initializer_factor", 0.1),
        use_mean_pooling=True,  # → no final norm, as InternViT has none
    )


def plan(src: Path, config: dict, shapes: dict[str, tuple[int, ...]]) -> dict:
    vit = config["vision_config"]
    image_size = config.get("force_image_size") or vit["image_size"]
    ratio = config.get("downsample_ratio", 0.5)
    if config.get("select_layer", -1) != -1:
        raise ConversionError(f"config.json select_layer={config['select_layer']}: the release uses -1")
    tokens = int((image_size // vit["patch_size"]) ** 2 * ratio**2)
    return {
        "text_config": text_config(config["llm_config"]),
        "vision_config": vision_config(vit, image_size),
        "plora": None,
        "projector": "ln_mlp2x_gelu",
        "vision_feature_layer": -1,
        "pixel_shuffle_ratio": ratio,
        "image": ImageSettings(size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample="bicubic",
                               tiling={"min_tiles": config.get("min_dynamic_patch", 1),
                                       "max_tiles": config.get("max_dynamic_patch", 6), "thumbnail": True}),
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
