"""What to train: TroL's training steps as parameter selections, LoRA/QLoRA, and merging.

Step 1 (paper): the vision projector and every TroL-Mixer learn; backbone and vision frozen.
Step 2: step 1's parts plus (Q)LoRA on the LLM's linear layers. "full": everything learns
(small models trained from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .modeling import TroLForConditionalGeneration

STAGES = ("1", "2", "full")
# Per family, the linear layers LoRA adapts by default (Phi-3 fuses q/k/v and gate/up).
DEFAULT_LORA_TARGETS = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "default": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: the family's attention + MLP projections


def is_stage1_parameter(name: str) -> bool:
    return name.startswith("vision.projector.") or ".mixer." in name


def is_lora_parameter(name: str) -> bool:
    """peft's LoRA (`….lora_A.default.weight`), not the released partial LoRA (`….plora_A.weight`)."""
    return ".lora_" in name


def is_partial_lora_parameter(name: str) -> bool:
    return ".plora_" in name


def lora_targets(model: TroLForConditionalGeneration, settings: LoraSettings) -> list[str]:
    family = model.config.text_config.model_type
    names = list(settings.target_modules or DEFAULT_LORA_TARGETS.get(family, DEFAULT_LORA_TARGETS["default"]))
    # A layer wrapped by a partial LoRA is adapted on its inner `base` linear (peft cannot wrap
    # our wrapper), so the partial LoRA stays on top and keeps working.
    wrapped = {n.rsplit(".", 2)[-2] for n, _ in model.named_modules() if n.endswith(".base")}
    return [f"{name}.base" if name in wrapped else name for name in names]


def add_lora(model: TroLForConditionalGeneration, settings: LoraSettings) -> None:
    """LoRA adapters on the LLM's linear layers, injected in place (state-dict keys of the
    rest stay as they are). Mixers, the vision side and the LM head are never adapted."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=lora_targets(model, settings),
        exclude_modules=r".*(mixer|lm_head).*",
    )
    inject_adapter_in_model(config, model.language_model)
    if not any(is_lora_parameter(n) for n, _ in model.named_parameters()):
        raise ValueError(f"lora.target_modules={config.target_modules} matched no linear layer of the LLM")


def select_trainable(model: TroLForConditionalGeneration, stage: str, train_partial_lora: bool = False) -> dict[str, int]:
    """Freeze everything the stage does not train; returns parameter counts. The released
    partial LoRA (image tokens only) trains in stage 2 only when asked, and always in "full"."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: choose one of {STAGES}")
    for name, param in model.named_parameters():
        if stage == "full":
            param.requires_grad_(True)
        elif stage == "1":
            param.requires_grad_(is_stage1_parameter(name))
        else:
            param.requires_grad_(is_stage1_parameter(name) or is_lora_parameter(name)
                                 or (train_partial_lora and is_partial_lora_parameter(name)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": sum(p.numel() for p in model.parameters())}


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base weight and remove the adapter modules, so the
    model saves as a plain TroL checkpoint. Returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
                merged += 1
    return merged


@dataclass
class TrainingParts:
    stage: str
    lora: LoraSettings | None = None
    counts: dict[str, int] = field(default_factory=dict)


def prepare_for_stage(
    model: TroLForConditionalGeneration, stage: str, lora: LoraSettings | None = None, train_partial_lora: bool = False
) -> TrainingParts:
    """Add adapters where the stage needs them and set requires_grad accordingly."""
    if stage == "2":
        add_lora(model, lora or LoraSettings())
    counts = select_trainable(model, stage, train_partial_lora)
    return TrainingParts(stage=stage, lora=lora if stage == "2" else None, counts=counts)


def quantization_config(bits: int | None, compute_dtype: torch.dtype = torch.float32):
    """QLoRA: the LLM's linear layers in 4-bit NF4 (bitsandbytes, CUDA or CPU), computing in
    `compute_dtype`; vision, projector, mixers, partial LoRA and LM head stay in full precision
    (trol.quantization.SKIP_MODULES)."""
    if not bits:
        return None
    if bits != 4:
        raise ValueError(f"quantize={bits}: only 4 (QLoRA NF4) is supported for training")
    from .quantization import bnb_config

    return bnb_config(4, compute_dtype)


def apply_saved_adapter(model: TroLForConditionalGeneration, adapter_dir: str) -> int:
    """Load a LoRA adapter saved beside a base model (keep_adapter) and merge it in."""
    import os

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    config = LoraConfig.from_pretrained(adapter_dir)
    inject_adapter_in_model(config, model.language_model)
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model.language_model, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{adapter_dir}: adapter keys do not fit this model: {result.unexpected_keys[:3]}")
    return merge_lora(model)


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup, then cosine decay to 0 at `total_steps`, and 0 after it (an epoch-based
    run whose step estimate was short must not see the rate climb back up)."""
    import math

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
