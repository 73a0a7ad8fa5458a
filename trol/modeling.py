"""TroLForConditionalGeneration: vision encoder + projector + a traversed causal LM."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import TroLConfig
from .plora import ImageTokenMask, PartialLoRALinear, PLoRASettings, add_partial_lora
from .traversal import TroLCache, TroLDecoderLayer, set_traversal, wrap_decoder_layers
from .vision import TroLVision


class TroLPreTrainedModel(PreTrainedModel):
    config: TroLConfig
    config_class = TroLConfig
    base_model_prefix = "trol"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_flash_attn = True
    _supports_sdpa = True
    _no_split_modules = ["TroLDecoderLayer"]
    _skip_keys_device_placement = "cache"


class TroLForConditionalGeneration(TroLPreTrainedModel, GenerationMixin):
    """Image features replace the image-placeholder tokens; the LLM's decoder layers are
    traversed as `config.traversal` says. `generate` follows GenerationMixin (greedy,
    sampling, per-row EOS, left padding) with a TroLCache."""

    def __init__(self, config: TroLConfig):
        super().__init__(config)
        self.vision = TroLVision(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        wrap_decoder_layers(self.language_model, config.text_config.hidden_size, config.traversal)
        # Filled from input_ids at each forward; read by the partial-LoRA adapters (if any).
        self.image_token_mask = ImageTokenMask()
        if config.plora is not None:
            add_partial_lora(self.language_model, self.plora_settings(), self.image_token_mask)
        self.post_init()

    def plora_settings(self) -> PLoRASettings | None:
        if self.config.plora is None:
            return None
        defaults = PLoRASettings()
        return PLoRASettings(
            r=int(self.config.plora["r"]),
            alpha=float(self.config.plora.get("alpha", self.config.plora["r"])),
            targets=tuple(self.config.plora.get("targets", defaults.targets)),
        )

    def partial_lora_layers(self) -> list[PartialLoRALinear]:
        return [m for m in self.language_model.modules() if isinstance(m, PartialLoRALinear)]

    # -- traversal -------------------------------------------------------------------------
    def set_traversal(self, mode: str) -> None:
        """Switch traversal on a loaded model; weights are the same in every mode."""
        set_traversal(self.language_model, mode)
        self.config.traversal = mode

    def mixers(self) -> list[nn.Module]:
        return [m.mixer for m in self.language_model.modules() if isinstance(m, TroLDecoderLayer)]

    # -- embeddings ------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def embed(self, input_ids: torch.LongTensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with each image's features written over its placeholder tokens."""
        embeds = self.get_input_embeddings()(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_placeholders = int(is_image.sum())
        if pixel_values is None or len(pixel_values) == 0:
            if n_placeholders:
                raise ValueError(f"input_ids hold {n_placeholders} image tokens but no pixel_values were given")
            return embeds
        features = self.vision(pixel_values).to(embeds.dtype)
        if features.shape[0] * features.shape[1] != n_placeholders:
            raise ValueError(
                f"{features.shape[0]} images × {features.shape[1]} tokens each do not match the "
                f"{n_placeholders} image tokens in input_ids; build inputs with TroLProcessor"
            )
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    # -- forward / generate ----------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: TroLCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids (with pixel_values for images) or inputs_embeds")
            inputs_embeds = self.embed(input_ids, pixel_values)
        if self.config.plora is not None:
            if input_ids is None:
                raise ValueError("this model has partial LoRA at image tokens: pass input_ids so it can find them")
            self.image_token_mask.set(input_ids == self.config.image_token_id)
        if kwargs.get("output_hidden_states") and self.config.traversal != "off":
            raise ValueError(
                "output_hidden_states is not supported while layers are traversed (each layer runs "
                "twice); use set_traversal('off') or a forward hook on TroLDecoderLayer"
            )
        if use_cache is None:  # a loss (training or eval) needs no cache
            use_cache = self.config.text_config.use_cache and not self.training and labels is None
        if use_cache and cache is None:
            cache = TroLCache(config=self.config.text_config)
        return self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def generate(self, *args, **kwargs):
        """GenerationMixin.generate with a TroLCache, so "full" traversal keeps both passes' K/V."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache", generation_config.use_cache)
        if use_cache is not False and kwargs.get("cache") is None:
            kwargs["cache"] = TroLCache(config=self.config.text_config)
        return super().generate(*args, **kwargs)
