"""Vision side: any transformers vision encoder, a chosen feature layer, optional pixel
shuffle, and the projector into the LLM's embedding space."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel

from .config import TroLConfig


def pixel_shuffle(features: torch.Tensor, grid: int, ratio: float) -> torch.Tensor:
    """Fold each (1/ratio)×(1/ratio) block of patches into one token with that many times the
    channels: (B, grid², C) → (B, (grid·ratio)², C/ratio²). Fewer, wider image tokens."""
    factor = round(1 / ratio)
    if grid % factor:
        raise ValueError(f"pixel_shuffle_ratio={ratio} needs a patch grid divisible by {factor}; got {grid}")
    batch, _, channels = features.shape
    side = grid // factor
    x = features.reshape(batch, side, factor, side, factor, channels)
    x = x.permute(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, side * side, factor * factor * channels)


class TroLProjector(nn.Module):
    """`mlp2x_gelu`: Linear–GELU–Linear; `ln_mlp2x_gelu`: the same after a LayerNorm."""

    def __init__(self, kind: str, in_features: int, out_features: int):
        super().__init__()
        self.norm = nn.LayerNorm(in_features) if kind == "ln_mlp2x_gelu" else nn.Identity()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.norm(features))))


class TroLVision(nn.Module):
    """pixel_values (N, 3, H, W) → image embeddings (N, image_seq_length, text hidden)."""

    def __init__(self, config: TroLConfig):
        super().__init__()
        self.config = config
        self.tower = AutoModel.from_config(config.vision_config)
        width = config.vision_config.hidden_size
        if config.pixel_shuffle_ratio is not None:
            width = int(width / config.pixel_shuffle_ratio**2)
        self.projector = TroLProjector(config.projector, width, config.text_config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        config = self.config
        pixel_values = pixel_values.to(dtype=self.tower.dtype)
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
        features = hidden[config.vision_feature_layer]
        grid = config.patch_grid
        if features.shape[1] == grid * grid + 1:  # CLIP-style encoders prepend a CLS token
            features = features[:, 1:]
        if config.pixel_shuffle_ratio is not None:
            features = pixel_shuffle(features, grid, config.pixel_shuffle_ratio)
        return self.projector(features)
