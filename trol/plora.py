"""Partial LoRA (PLoRA): a low-rank update applied only at image-token positions.

The released TroL-1.8B/7B (InternLM-XComposer2 lineage) adapt every LLM linear layer this way:
y = W x + m · B(A(x)) · alpha/r, where m is 1 at image tokens and 0 elsewhere. Text tokens see
the plain backbone, so the adapter cannot be merged into W: it is kept as a wrapper.

The mask is read from a small holder that the model fills from its input ids at the start of
every forward (`ImageTokenMask.set`). It is left in place until the next forward, so a
gradient-checkpointing recomputation during backward still sees the mask of its own step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class ImageTokenMask:
    """Where the image tokens of the current forward are: a bool tensor (batch, seq) or None."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask


@dataclass
class PLoRASettings:
    r: int = 256
    alpha: float = 256.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @property
    def scale(self) -> float:
        return self.alpha / self.r


class PartialLoRALinear(nn.Module):
    """`base` (the backbone's own nn.Linear) plus plora_B(plora_A(x)) at image positions."""

    def __init__(self, base: nn.Linear, r: int, scale: float, image_mask: ImageTokenMask):
        super().__init__()
        self.base = base
        self.plora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.plora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.scale = scale
        self._image_mask = image_mask  # shared by every adapter of the model; not a submodule

    @property
    def weight(self) -> torch.Tensor:  # code that inspects `proj.weight` (dtype, device) keeps working
        return self.base.weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        mask = self._image_mask.mask
        if mask is None or x.dim() != 3:
            return out
        if mask.shape != x.shape[:2]:
            raise RuntimeError(
                f"image-token mask {tuple(mask.shape)} does not fit the input {tuple(x.shape[:2])}; call the "
                "TroL model (it sets the mask from input_ids), not its language model directly"
            )
        if not bool(mask.any()):
            return out
        rows, cols = mask.nonzero(as_tuple=True)
        update = self.plora_B(self.plora_A(x[rows, cols])) * self.scale
        return out.index_put((rows, cols), update.to(out.dtype), accumulate=True)

    def merge(self) -> None:
        raise NotImplementedError(
            "a partial LoRA only applies at image tokens, so it cannot be folded into the base weight; "
            "keep the adapter (it is saved with the model)"
        )

    def extra_repr(self) -> str:
        return f"r={self.plora_A.out_features}, scale={self.scale}"


def add_partial_lora(language_model: nn.Module, settings: PLoRASettings, image_mask: ImageTokenMask) -> int:
    """Wrap each target nn.Linear of the decoder layers in place; returns how many."""
    wrapped = 0
    for parent in list(language_model.modules()):
        for name, child in list(parent.named_children()):
            if name in settings.targets and isinstance(child, nn.Linear):
                setattr(parent, name, PartialLoRALinear(child, settings.r, settings.scale, image_mask))
                wrapped += 1
    if not wrapped:
        raise ValueError(f"plora.targets={list(settings.targets)} matched no linear layer of the language model")
    return wrapped
