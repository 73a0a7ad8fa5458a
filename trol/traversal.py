"""Traversal of layers: run each of the backbone's own decoder layers twice and mix.

We wrap the backbone's layer objects (no copied model code): `TroLDecoderLayer.layer` is the
original Llama/Qwen2/Phi-3/... layer and `TroLDecoderLayer.mixer` its TroL-Mixer. The wrapper
exists in every mode, so state-dict keys never depend on the mode.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from .config import TRAVERSAL_MODES
from .mixer import TroLMixer


class TroLCache(DynamicCache):
    """The backbone's KV cache plus a second one for the traversal pass (mode "full").

    The model and its mask code only see the first-pass cache; the wrapper hands
    `.traversal` to the second pass. Every cache operation generation uses (beam reorder,
    crop, batch expansion) is applied to both so they stay the same length.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.traversal = DynamicCache(config=config)

    def reset(self) -> None:
        super().reset()
        self.traversal.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.traversal.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.traversal.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.traversal.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.traversal.batch_select_indices(indices)


class _PastPrefix:
    """A read-only view for a "prefill"-mode second pass that extends a non-empty cache.

    The second pass attends to the cached first-pass K/V of earlier tokens plus its own K/V
    for the current tokens, and stores nothing (the released behaviour never caches it).
    """

    def __init__(self, cache: DynamicCache, past_length: int):
        self.cache, self.past_length = cache, past_length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        if getattr(layer, "is_sliding", False):
            raise ValueError(
                "traversal='prefill' cannot extend a sliding-window cache by several tokens; "
                "use traversal='full'"
            )
        keys = torch.cat([layer.keys[..., : self.past_length, :], key_states], dim=-2)
        values = torch.cat([layer.values[..., : self.past_length, :], value_states], dim=-2)
        return keys, values


class TroLDecoderLayer(nn.Module):
    """One backbone decoder layer L, traversed: h1 = L(x), h2 = L(h1), out = mix(h1, h2)."""

    def __init__(self, layer: nn.Module, hidden_size: int, layer_idx: int, traversal: str):
        super().__init__()
        self.layer = layer
        self.mixer = TroLMixer(hidden_size)
        self.layer_idx = layer_idx
        self.traversal = traversal

    def __getattr__(self, name: str):
        # Decoder loops read attributes such as `attention_type` off their layers.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self.layer, name)

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, **kwargs) -> torch.Tensor:
        if self.traversal == "off":
            return self.layer(hidden_states, *args, cache=cache, **kwargs)
        past_length = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        h1 = self.layer(hidden_states, *args, cache=cache, **kwargs)

        if self.traversal == "full":
            if cache is not None and not isinstance(cache, TroLCache):
                raise TypeError(
                    "traversal='full' needs a trol.TroLCache (it keeps the second pass's K/V); "
                    f"got {type(cache).__name__}. Pass cache=TroLCache(config.text_config) or none."
                )
            second_cache = cache.traversal if cache is not None else None
        else:  # prefill: a cached one-token decode step runs the layer once
            if cache is not None and past_length > 0 and hidden_states.shape[1] == 1:
                return h1
            second_cache = _PastPrefix(cache, past_length) if past_length > 0 else None
        h2 = self.layer(h1, *args, cache=second_cache, **kwargs)
        return self.mixer(h1, h2)


def decoder_layers(language_model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers of a transformers causal LM."""
    base = language_model.get_decoder() if hasattr(language_model, "get_decoder") else language_model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(language_model).__name__}: no `layers` ModuleList found to traverse")
    return layers


def wrap_decoder_layers(language_model: nn.Module, hidden_size: int, traversal: str) -> None:
    """Replace each decoder layer by a TroLDecoderLayer around it (in place)."""
    layers = decoder_layers(language_model)
    for idx, layer in enumerate(layers):
        if isinstance(layer, TroLDecoderLayer):
            raise ValueError("decoder layers are already wrapped for traversal")
        layers[idx] = TroLDecoderLayer(layer, hidden_size, idx, traversal)


def set_traversal(language_model: nn.Module, traversal: str) -> None:
    if traversal not in TRAVERSAL_MODES:
        raise ValueError(f"traversal={traversal!r}: choose one of {TRAVERSAL_MODES}")
    for layer in decoder_layers(language_model):
        layer.traversal = traversal
