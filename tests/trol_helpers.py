"""Shared helpers for the model tests: tiny models and inputs, built in memory."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from trol.tiny import build_tiny

BACKBONES = ["llama", "qwen2", "phi3"]
PROMPT = "Describe the image."


def tiny(backbone: str = "llama", traversal: str = "full", **kwargs):
    model, processor = build_tiny(backbone, traversal, **kwargs)
    # Random mixers with a visible spread, so a wrong gate or a skipped pass shows in the logits.
    torch.manual_seed(1)
    for mixer in model.mixers():
        torch.nn.init.normal_(mixer.gate_linear.weight, std=0.5)
        torch.nn.init.normal_(mixer.gate_linear.bias, std=0.5)
    return model.eval(), processor


def images(n: int, size: int = 40, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size + 7 * i, 3), dtype=np.uint8)) for i in range(n)]


def mixed_batch(processor, with_images=(True, False, True)):
    """Prompts of different lengths, some with an image and some without."""
    prompts = [PROMPT, "Say something short about the weather and the sky today.", "What is shown in this picture, in a few words?"]
    text = [processor.build_prompt(p, with_image=w) for p, w in zip(prompts, with_images)]
    imgs = [im if w else None for im, w in zip(images(len(text)), with_images)]
    return text, imgs
