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
    crop, batch expansion, past recording) is applied to both so they stay aligned; in
    "prefill"/"off" mode the traversal cache stays empty and is left alone.
    """

    def __init__(self, config=None, **kwargs):
        super().__init__(config=config, **kwargs)
        self.traversal = DynamicCache(config=config)

    def _traversal_in_use(self) -> bool:
        return any(getattr(layer, "is_initialized", False) for layer in self.traversal.layers)

    def reset(self) -> None:
        super().reset()
        if self._traversal_in_use():
            self.traversal.reset()

    def activate_past_recording(self) -> None:
        super().activate_past_recording()
        self.traversal.activate_past_recording()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._traversal_in_use():
            self.traversal.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self._traversal_in_use():
            self.traversal.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self._traversal_in_use():
            self.traversal.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self._traversal_in_use():
            self.traversal.batch_select_indices(indices)


class _PastPrefix:
    """A read-only view for a "prefill"-mode second pass that extends a non-empty cache.

    The second pass attends to what the first pass saw of earlier tokens (the cached
    first-pass K/V, as stored before this step; for a sliding-window layer that is its
    window) plus its own K/V for the current tokens, and stores nothing: the released
    behaviour never caches the second pass.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


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
        if self.traversal == "prefill" and past_length > 0:
            if hidden_states.shape[1] == 1:  # a cached one-token decode step runs the layer once
                return self.layer(hidden_states, *args, cache=cache, **kwargs)
            # Cache layers replace (never mutate) their tensors, so these stay "before this step".
            stored = cache.layers[self.layer_idx]
            past = _PastPrefix(stored.keys, stored.values)
        h1 = self.layer(hidden_states, *args, cache=cache, **kwargs)

        if self.traversal == "full":
            if cache is not None and not isinstance(cache, TroLCache):
                raise TypeError(
                    "traversal='full' needs a trol.TroLCache (it keeps the second pass's K/V); "
                    f"got {type(cache).__name__}. Pass cache=TroLCache(config.text_config) or none."
                )
            second_cache = cache.traversal if cache is not None else None
        else:  # prefill: multi-token passes traverse; the second pass caches nothing
            second_cache = past if past_length > 0 else None
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
