"""Step hooks for fine-tuning tests: they run inside Ray Train workers (importable there
because conftest puts tests/ on the workers' PYTHONPATH). Fault injection lives here, not in
the training loop."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class KillOnce:
    """Kill the worker of `rank` right after `step`, once: a marker file lets the restarted
    attempt go on. The pause lets Ray Train's controller register the last checkpoint before
    the process dies, so tests check restarting, not that race."""

    def __init__(self, step: int, marker: str, rank: int = -1):
        self.step, self.marker, self.rank = step, marker, rank

    def __call__(self, info) -> None:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_initialized() else 1
        if info.step == self.step and info.rank == self.rank % world and not os.path.exists(self.marker):
            Path(self.marker).touch()
            time.sleep(2.0)
            os._exit(1)


class RecordRows:
    """Append (attempt, rank, step, epoch, rows) for every step to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path
        self.attempt = f"{os.getpid()}-{time.time_ns()}"

    def __call__(self, info) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"attempt": self.attempt, "rank": info.rank, "step": info.step,
                                "epoch": info.epoch, "rows": info.rows}) + "\n")


def rows_per_epoch(path: str) -> dict[int, list[int]]:
    """Rows trained per epoch, keeping for each (rank, step) only the attempt that wrote it
    last (a killed attempt's steps after its checkpoint were redone by the next one)."""
    latest: dict[tuple[int, int], dict] = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        latest[(record["rank"], record["step"])] = record
    epochs: dict[int, list[int]] = {}
    for record in latest.values():
        epochs.setdefault(record["epoch"], []).extend(record["rows"])
    return {e: sorted(rows) for e, rows in sorted(epochs.items())}
