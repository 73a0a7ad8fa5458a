"""TroLConfig: a vision encoder, a projector and a causal LM whose layers are traversed."""

from __future__ import annotations

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

TRAVERSAL_MODES = ("off", "prefill", "full")
PROJECTORS = ("mlp2x_gelu", "ln_mlp2x_gelu")


class TroLConfig(PreTrainedConfig):
    """Configuration of a TroL vision-language model.

    `text_config` is any causal-LM config (Llama, Qwen2, Phi-3, ...) and `vision_config` any
    transformers vision-encoder config (CLIP, SigLIP, ...). `traversal` picks how the decoder
    layers are reused: "off" (plain backbone), "prefill" (the released TroL behaviour: only
    multi-token passes traverse) or "full" (every token traverses; the second pass has its own
    KV cache so cached decoding equals recomputation).
    """

    model_type = "trol"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 0
    projector: Literal["mlp2x_gelu", "ln_mlp2x_gelu"] = "mlp2x_gelu"
    # -2 = the penultimate encoder layer, as LLaVA-style models (and TroL's CLIP variants) use.
    vision_feature_layer: int = -2
    # 0.5 halves each side of the patch grid (InternViT-style), so a tile yields 1/4 the tokens.
    pixel_shuffle_ratio: float | None = None
    traversal: Literal["off", "prefill", "full"] = "full"
    tie_word_embeddings: bool = False
    # Partial LoRA at image tokens ({"r", "alpha", "targets"}), as TroL-1.8B/7B carry; None: none.
    plora: dict | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.traversal not in TRAVERSAL_MODES:
            raise ValueError(f"traversal={self.traversal!r}: choose one of {TRAVERSAL_MODES}")
        if self.projector not in PROJECTORS:
            raise ValueError(f"projector={self.projector!r}: choose one of {PROJECTORS}")
        if self.pixel_shuffle_ratio is not None and not 0 < self.pixel_shuffle_ratio <= 1:
            raise ValueError("pixel_shuffle_ratio must be in (0, 1], e.g. 0.5, or None to disable it")
        if self.plora is not None:
            unknown = set(self.plora) - {"r", "alpha", "targets"}
            if unknown or int(self.plora.get("r", 0)) < 1:
                raise ValueError(f"plora={self.plora}: expected {{'r': int >= 1, 'alpha': float, 'targets': [...]}}")

    @property
    def patch_grid(self) -> int:
        """Patches per side of the vision encoder's square input."""
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        size = size[0] if isinstance(size, (list, tuple)) else size  # InternViT configs store (h, w)
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return size // patch

    @property
    def image_seq_length(self) -> int:
        """How many LLM tokens one image becomes (after pixel shuffle)."""
        side = self.patch_grid
        if self.pixel_shuffle_ratio is not None:
            side = int(side * self.pixel_shuffle_ratio)
        return side * side


AutoConfig.register("trol", TroLConfig)
