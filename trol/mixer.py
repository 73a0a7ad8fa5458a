"""TroL-Mixer: the token-wise gate that blends a layer's first and second pass."""

from __future__ import annotations

import torch
from torch import nn


class TroLMixer(nn.Module):
    """s = 0.5·tanh(w·h1 + b) + 0.5 per token; output (1 − s)·h1 + s·h2.

    One gate per decoder layer, d + 1 parameters (w ∈ R^d and b). The gate reads the first
    pass h1 only, so a token decides from what it already knows whether a second look helps.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.gate_linear = nn.Linear(hidden_size, 1)

    def gate(self, h1: torch.Tensor) -> torch.Tensor:
        """The mixing weight s ∈ (0, 1), shape (..., 1)."""
        return 0.5 * torch.tanh(self.gate_linear(h1)) + 0.5

    def forward(self, h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
        # lerp is h1 + s·(h2 − h1), the same blend in one pass over the activations instead
        # of three (two products and a sum), in the activations' own dtype.
        return torch.lerp(h1, h2, self.gate(h1).to(h1.dtype))
