"""One optimizer step over a few micro-batches, with the loss weighted by token.

The step's loss is the sum of token losses over every micro-batch on every rank divided by
the global count of label tokens, so a micro-batch with few answer tokens weighs that much
less (averaging per-micro-batch means would not). Nothing here waits for the host: counts
stay on the device and are summed across ranks with one all-reduce per step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .parallel import gradient_sync, label_tokens

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "pixel_values")


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's summed token loss (detached)
    label_tokens: torch.Tensor  # global: every rank, every micro-batch
    tokens: torch.Tensor  # this rank's tokens in rows that train (padding excluded)


def autocast_for(spec: Any, device: torch.device):
    """bf16 autocast for DDP on a bf16 GPU (FSDP2 casts through its own policy)."""
    from .parallel import bf16_on

    if spec.strategy == "ddp" and bf16_on(spec, device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if spec.dtype == "bfloat16" and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def global_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def model_inputs(batch: dict[str, torch.Tensor], normalize) -> dict[str, torch.Tensor]:
    """The model's arguments; uint8 pixels are normalised here, on the device."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "pixel_values" in inputs and inputs["pixel_values"].dtype == torch.uint8:
        inputs["pixel_values"] = normalize(inputs["pixel_values"])
    return inputs


def trained_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Non-padding tokens of rows that carry labels (placeholder rows excluded)."""
    trains = (batch["labels"] != -100).any(dim=1)
    return (batch["attention_mask"].sum(dim=1) * trains).sum()


def train_step(model: torch.nn.Module, micro_batches: list[dict[str, torch.Tensor]], optimizer, scheduler,
               params: list[torch.nn.Parameter], *, max_grad_norm: float, normalize, autocast) -> StepResult:
    world = dist.get_world_size() if dist.is_initialized() else 1
    count = global_sum(sum(label_tokens(b["labels"]) for b in micro_batches).float())
    # Parallel wrappers average gradients over ranks; `world` undoes that average.
    scale = world / count.clamp(min=1.0)
    loss_sum = torch.zeros((), device=count.device)
    tokens = torch.zeros((), dtype=torch.long, device=count.device)
    for i, batch in enumerate(micro_batches):
        with gradient_sync(model, i == len(micro_batches) - 1), autocast:
            loss = model(**model_inputs(batch, normalize))
        (loss * scale).backward()
        loss_sum += loss.detach().float()
        tokens += trained_tokens(batch)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_sum, count, tokens)


@torch.no_grad()
def eval_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor], normalize, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    with autocast:
        loss = model(**model_inputs(batch, normalize))
    return loss.detach().float(), label_tokens(batch["labels"]).float()
