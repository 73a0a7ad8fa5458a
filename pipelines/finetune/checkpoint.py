"""Training checkpoints and the final model export (Ray-agnostic file I/O).

A checkpoint folder holds `model.safetensors` (the full state dict, adapters included) and
`training_state.pt` (optimizer, scheduler, step, data position, loss history), loaded with
`torch.load(weights_only=True)`. The final export is a plain TroL model folder (LoRA merged,
or kept in `adapter/` with keep_adapter) plus processor files: the caption job loads it as is.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
ADAPTER_DIR = "adapter"


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of the epoch's plan consumed (the same on every worker)
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: list[int] = field(default_factory=list)
    data: dict[str, int] = field(default_factory=dict)
    tokens_seen: int = 0  # all workers, this run and the runs it resumed
    train_seconds: float = 0.0  # wall time in optimizer steps (data loading included)
    data_wait_seconds: float = 0.0  # of train_seconds, time spent waiting for batches
    data_startup_seconds: float = 0.0  # waits for each epoch's first batch (not in train_seconds)


def rng_states() -> dict[str, Any]:
    """Every generator a step draws from (dropout, LoRA dropout), to resume bit for bit."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # Plain tensors and numbers only: checkpoints are read with torch.load(weights_only=True).
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
              "python": list(random.getstate())}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): copy the repeats."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def save_checkpoint(directory: str, model_state: dict[str, torch.Tensor], optim_state: dict[str, Any],
                    scheduler: Any, state: TrainState) -> None:
    os.makedirs(directory, exist_ok=True)
    save_file(_unshared(model_state), os.path.join(directory, MODEL_FILE))
    save_train_state(directory, scheduler, state, optimizer=optim_state)


def save_train_state(directory: str, scheduler: Any, state: TrainState, optimizer: dict[str, Any] | None = None) -> None:
    saved = {"scheduler": scheduler.state_dict(), "train": asdict(state)}
    if optimizer is not None:
        saved["optimizer"] = optimizer
    torch.save(saved, os.path.join(directory, STATE_FILE))


def load_train_state(directory: str) -> tuple[dict[str, Any] | None, dict[str, Any], TrainState]:
    """(optimizer state or None when sharded, scheduler state, train state)."""
    saved = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    if "batches_in_epoch" in saved["train"]:
        raise ValueError(f"{directory}: written by an older trol-ray whose data order cannot be resumed exactly; "
                         "start a fresh run (a new name or output)")
    return saved.get("optimizer"), saved["scheduler"], TrainState(**saved["train"])


def load_checkpoint(directory: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any], TrainState]:
    model_state = load_file(os.path.join(directory, MODEL_FILE))
    optimizer, scheduler, state = load_train_state(directory)
    return model_state, optimizer, scheduler, state


def export_model(model: Any, processor: Any, directory: str, keep_adapter: bool) -> None:
    """Write the final TroL folder. `model` is a plain (unwrapped, CPU) TroL model that may
    carry LoRA adapters."""
    from trol.training import merge_lora

    Path(directory).mkdir(parents=True, exist_ok=True)
    has_lora = any("lora_" in n for n, _ in model.named_parameters())
    if has_lora and keep_adapter:
        from peft import get_peft_model_state_dict

        adapter_state = get_peft_model_state_dict(model.language_model)
        peft_config = model.language_model.peft_config["default"]
        # Cloned: merging below folds the adapters into these very tensors.
        base_state = {k.replace(".base_layer.", "."): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        adapter_dir = Path(directory) / ADAPTER_DIR
        adapter_dir.mkdir(exist_ok=True)
        save_file(_unshared(adapter_state), str(adapter_dir / "adapter_model.safetensors"))
        (adapter_dir / "adapter_config.json").write_text(json.dumps(peft_config.to_dict(), indent=2, default=list))
        merge_lora(model)  # only to get the plain module structure; weights come from base_state
        model.save_pretrained(directory, state_dict=base_state)
    else:
        if has_lora:
            merge_lora(model)
        model.save_pretrained(directory)
    processor.save_pretrained(directory)


def write_loss_curve(history: list[dict[str, float]], path: str, title: str) -> None:
    """Training (and eval) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="train loss", marker=".")
    evals = [(h["step"], h["eval_loss"]) for h in history if h.get("eval_loss") is not None]
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
