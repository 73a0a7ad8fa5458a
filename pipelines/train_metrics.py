"""Training metrics across workers: loss, tokens/s and step time, averaged over an interval."""

from __future__ import annotations

from typing import Any


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or min) a few numbers over the process group; identity when training alone."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}[op])
    return t.tolist()


class StepMeter:
    """Accumulates since the last flush; `flush` is a collective (every worker calls it)."""

    def __init__(self, world_size: int):
        self.world = world_size
        self._reset()

    def _reset(self) -> None:
        self.loss, self.micro, self.tokens, self.seconds, self.steps = 0.0, 0, 0, 0.0, 0

    def add_micro_batch(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.micro += 1
        self.tokens += tokens

    def add_step(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def flush(self, step: int, lr: float) -> dict[str, Any] | None:
        loss, micro, tokens, seconds, steps = all_reduce([self.loss, self.micro, self.tokens, self.seconds, self.steps])
        self._reset()
        if not micro:
            return None
        per_worker_seconds = max(seconds / self.world, 1e-9)
        return {
            "step": step,
            "loss": loss / micro,
            "lr": lr,
            "tokens_per_s": tokens / per_worker_seconds,  # all workers' tokens over wall time
            "step_time_s": per_worker_seconds / max(steps / self.world, 1),
            "tokens": tokens,
            "seconds": per_worker_seconds,
        }
