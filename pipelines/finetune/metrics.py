"""Training metrics across workers: loss, tokens/s, data wait and MFU over an interval.

Per-step values stay on the device; `flush` (a collective: every worker calls it) moves them
to the host once per log interval.
"""

from __future__ import annotations

import time
from typing import Any

import torch

# Dense bf16 peak per GPU, in FLOP/s (vendor datasheets, without sparsity).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or min) a few numbers over the process group; identity when training alone."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


def traversed_parameters(model: torch.nn.Module) -> int:
    """Parameters a token passes through, each decoder layer counted twice (TroL runs every
    layer twice). The input embedding (a lookup) and the vision tower are left out."""
    from trol import TroLDecoderLayer

    layers = sum(p.numel() for m in model.modules() if isinstance(m, TroLDecoderLayer) for p in m.layer.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.language_model.parameters()) - embedding + layers


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the table for known GPUs, else a measured matmul."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS.items():
            if key in name:
                return peak, f"{key} bf16 datasheet"
    # The fastest of several short trials: on a shared CPU a single timing mostly measures
    # the neighbours, and a low peak would inflate MFU.
    size, repeats, best = 512, 4, float("inf")
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    for _ in range(10):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / max(best, 1e-9), f"measured fp32 matmul on {device.type}"


class StepMeter:
    def __init__(self, world: int, device: torch.device, flops_per_token: float, peak_flops: float):
        self.world, self.device = world, device
        self.flops_per_token, self.peak = flops_per_token, peak_flops
        self._reset()

    def _reset(self) -> None:
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss, self.labels, self.tokens = zero.clone(), zero.clone(), zero.clone()
        self.seconds, self.wait, self.steps = 0.0, 0.0, 0

    def add_step(self, loss_sum: torch.Tensor, label_tokens: torch.Tensor, tokens: torch.Tensor,
                 seconds: float, wait_seconds: float) -> None:
        self.loss += loss_sum
        self.labels += label_tokens  # already global
        self.tokens += tokens
        self.seconds += seconds
        self.wait += wait_seconds
        self.steps += 1

    def flush(self, step: int, lr: float) -> dict[str, Any] | None:
        loss, tokens, seconds, wait, steps = all_reduce(
            [float(self.loss), float(self.tokens), self.seconds, self.wait, float(self.steps)])
        labels = float(self.labels)
        self._reset()
        if not steps:
            return None
        per_worker_seconds = max(seconds / self.world, 1e-9)
        tokens_per_s = tokens / per_worker_seconds  # all workers' tokens over wall time
        return {
            "step": step,
            "loss": loss / max(labels, 1.0),
            "lr": lr,
            "tokens_per_s": tokens_per_s,
            "step_time_s": per_worker_seconds / max(steps / self.world, 1),
            "data_wait": wait / max(seconds, 1e-9),
            "mfu": self.flops_per_token * tokens_per_s / self.world / self.peak,
            "tokens": tokens,
            "seconds": per_worker_seconds,
        }


def log_line(entry: dict[str, Any], total_steps: int) -> str:
    return (f"step {entry['step']}/{total_steps} loss {entry['loss']:.4f} lr {entry['lr']:.2e} "
            f"{entry['tokens_per_s']:.0f} tok/s {entry['step_time_s']:.3f} s/step "
            f"data wait {100 * entry['data_wait']:.1f}% MFU {100 * entry['mfu']:.2f}%")
