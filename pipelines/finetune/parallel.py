"""The model a worker trains: loaded for its stage, its loss, and wrapped for DDP or FSDP2.

`TokenLossModule` is what the parallel wrapper sees: its forward returns the *sum* of token
losses (the step divides by the global label-token count) and always runs the vision path,
so every rank touches the same parameters in the same order whether or not its batch holds
an image (DDP needs no unused-parameter search; FSDP2's collectives line up).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .checkpoint import ADAPTER_DIR

IGNORE_INDEX = -100


class TokenLossModule(nn.Module):
    def __init__(self, model: nn.Module, image_size: int):
        super().__init__()
        self.model = model
        self.image_size = image_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                            use_cache=False).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX, reduction="sum")
        if pixel_values is None:
            # No image here: run the vision path on a blank tile with zero weight, so its
            # parameters get (zero) gradients like on every other rank.
            blank = torch.zeros(1, 3, self.image_size, self.image_size, device=input_ids.device)
            loss = loss + 0.0 * self.model.vision(blank).float().sum()
        return loss


def label_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens the loss covers (the first position predicts nothing)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def load_for_stage(spec: Any, path: str, device: torch.device, *, quantize: bool = True):
    """The model with the stage's adapters and trainable set. On GPU with bf16, frozen weights
    load in bf16 (no per-use casts, half the memory) while trainable ones stay fp32."""
    from trol import TroLForConditionalGeneration, TroLProcessor
    from trol.quantization import load_kwargs, set_cpu_repacking
    from trol.training import LoraSettings, apply_saved_adapter, prepare_for_stage

    bits = spec.quantize if quantize else None
    low_precision = bf16_on(spec, device) and spec.stage != "full"
    dtype = torch.bfloat16 if low_precision else torch.float32
    # QLoRA: the 4-bit layers compute in the frozen weights' dtype (bf16 on GPUs, fp32 on CPU).
    model = TroLForConditionalGeneration.from_pretrained(path, dtype=dtype, **load_kwargs(bits, dtype, device))
    if bits:
        set_cpu_repacking(model, allowed=False)
    adapter = os.path.join(path, ADAPTER_DIR)
    if os.path.isfile(os.path.join(adapter, "adapter_config.json")):  # a keep_adapter export as base
        if bits:
            raise ValueError(f"{path} keeps a LoRA adapter beside its base; a 4-bit base cannot absorb it. "
                             "Export that run with keep_adapter: false, then use it as base_model")
        apply_saved_adapter(model, adapter)
    prepare_for_stage(model, spec.stage, LoraSettings(**spec.lora.model_dump()), train_partial_lora=spec.train_partial_lora)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # optimizer state and updates in fp32
    return model, TroLProcessor.from_pretrained(path)


def bf16_on(spec: Any, device: torch.device) -> bool:
    return (device.type == "cuda" and spec.dtype in ("auto", "bfloat16") and torch.cuda.is_bf16_supported())


def freeze_unreachable_vision(model: nn.Module, image_size: int) -> list[str]:
    """Vision parameters that cannot reach the chosen feature layer (the layers after it, a
    pooler) never get a gradient; freeze them so DDP needs no unused-parameter search.
    Only trainable vision parameters are probed, with one blank tile."""
    vision = [(n, p) for n, p in model.vision.named_parameters() if p.requires_grad]
    if not vision:
        return []
    device = next(model.parameters()).device
    model.vision(torch.zeros(1, 3, image_size, image_size, device=device)).float().sum().backward()
    frozen = [n for n, p in vision if p.grad is None]
    for name, param in vision:
        param.grad = None
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def wrap(module: TokenLossModule, spec: Any, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 with one unit per traversed decoder layer (bf16 compute on GPU)."""
    import torch.distributed as dist

    from trol import TroLDecoderLayer

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module.to(device)
    if spec.strategy == "ddp":
        module = module.to(device)
        return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if device.type == "cuda":
        torch.cuda.set_device(device)  # fully_shard moves each unit to the mesh's current device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Gradients are reduced in fp32 so small updates to fp32 parameters are not lost.
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if bf16_on(spec, device) else MixedPrecisionPolicy()
    for layer in module.modules():
        if isinstance(layer, TroLDecoderLayer):
            fully_shard(layer, mesh=mesh, mp_policy=policy)  # moves and shards one layer at a time
    fully_shard(module, mesh=mesh, mp_policy=policy)
    return module


def gradient_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not enabled:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def inner(model: nn.Module) -> TokenLossModule:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
