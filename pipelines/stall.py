"""When a job stops making progress, say what it is waiting for.

`StallWatch` runs beside a job's driver. Whatever moves the job forward calls `progress()`
(a training step, a committed shard). After `after_s` seconds without it, the watch logs one
WARNING naming how long, each stage's state and how long it has been in it, and Ray's
pending resource demands: tasks and actors that cannot be scheduled, and placement groups
not yet placed, with the CPUs and GPUs free. It repeats every `after_s` while the stall
lasts and says so when progress resumes.

Stages come from the job: a callable returning {stage: state}. Work that runs in other
processes (training workers) posts its stage to a `StageBoard` actor, which the driver reads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _demand_text(bundles_by_count: list[Any]) -> str:
    return " + ".join(f"{_resources(r.bundle)} x{r.count}" for r in bundles_by_count)


def _resources(bundle: dict[str, float]) -> str:
    shown = {k: v for k, v in sorted(bundle.items()) if not k.startswith(("node:", "bundle_group"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in shown.items()) + "}"


def pending_demands() -> str:
    """Ray's view: what waits for resources, and what is free (from the GCS; no dashboard)."""
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception as exc:  # noqa: BLE001 - the message must not fail the job it describes
        return f"Ray's pending demands are unavailable ({type(exc).__name__}: {exc})"
    demands = status.resource_demands
    parts = [f"tasks/actors waiting for {_demand_text(d.bundles_by_count)}" for d in demands.ray_task_actor_demand]
    parts += [f"placement group {d.pg_id[:8]} {d.state.lower()}: {d.strategy} {_demand_text(d.bundles_by_count)}"
              for d in demands.placement_group_demand]
    total, free = status.total_resources(), status.available_resources()
    capacity = ", ".join(f"{k} {free.get(k, 0):g}/{total[k]:g} free" for k in ("CPU", "GPU") if total.get(k))
    return ("Ray is waiting for: " + "; ".join(parts) if parts else "Ray has no pending resource demands") + \
        f" ({capacity or 'no CPUs or GPUs'})"


class StallWatch:
    """Logs what a job waits for after `after_s` seconds without `progress()`."""

    def __init__(self, job: str, after_s: float, stages: Callable[[], dict[str, str]] | None = None,
                 counter: Callable[[], int] | None = None, demands: Callable[[], str] = pending_demands,
                 emit: Callable[[str], None] | None = None):
        """`counter`, when given, is read at every check: a change counts as progress (for work
        whose progress is counted elsewhere, e.g. on a StageBoard)."""
        self.job, self.after_s = job, after_s
        self.stages, self.counter, self.demands = stages or (lambda: {}), counter, demands
        self._count: int | None = None
        self.emit = emit or log.warning
        self._last = time.monotonic()
        self._warned_at: float | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"{job}-stall-watch", daemon=True)

    def __enter__(self) -> StallWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def progress(self) -> None:
        with self._lock:
            self._last = time.monotonic()
            stalled, self._warned_at = self._warned_at is not None, None
        if stalled:
            self.emit(f"{self.job}: progressing again")

    def _run(self) -> None:
        while not self._stop.wait(min(self.after_s / 4, 15.0)):
            self._read_counter()
            with self._lock:
                idle = time.monotonic() - self._last
                due = idle >= self.after_s and (self._warned_at is None or
                                                time.monotonic() - self._warned_at >= self.after_s)
                if due:
                    self._warned_at = time.monotonic()
            if due:
                self.emit(self.describe(idle))

    def _read_counter(self) -> None:
        if self.counter is None:
            return
        try:
            count = self.counter()
        except Exception:  # noqa: BLE001 - an unreadable counter is no progress, and no crash
            return
        if count != self._count:
            moved, self._count = self._count is not None, count
            if moved:
                self.progress()

    def describe(self, idle_s: float) -> str:
        try:
            stages = self.stages()
        except Exception as exc:  # noqa: BLE001
            stages = {"stages": f"unknown ({type(exc).__name__}: {exc})"}
        where = "; ".join(f"{name}: {state}" for name, state in stages.items()) or "no stage has reported yet"
        return f"{self.job}: no progress for {idle_s:.0f} s. {where}. {self.demands()}"


class StageBoard:
    """A Ray actor (num_cpus=0) where remote parts of a job post their stage and progress."""

    def __init__(self) -> None:
        self._stages: dict[str, tuple[str, float, int]] = {}  # name -> (stage, since, progress count)

    def post(self, name: str, stage: str, since: float, count: int) -> None:
        self._stages[name] = (stage, since, count)

    def snapshot(self) -> dict[str, tuple[str, float, int]]:
        return dict(self._stages)


class BoardReader:
    """The driver's side of a StageBoard: `count()` for StallWatch's counter, `stages()` for
    its message (from the last snapshot `count()` read)."""

    def __init__(self, board: Any, timeout_s: float = 10.0):
        self.board, self.timeout_s = board, timeout_s
        self._snapshot: dict[str, tuple[str, float, int]] = {}

    def count(self) -> int:
        import ray

        self._snapshot = ray.get(self.board.snapshot.remote(), timeout=self.timeout_s)
        return sum(count for _, _, count in self._snapshot.values())

    def stages(self) -> dict[str, str]:
        now = time.time()
        return {name: f"{stage} for {now - since:.0f} s ({count} done)"
                for name, (stage, since, count) in sorted(self._snapshot.items())}


class StagePoster:
    """The remote side: `enter(stage)` and `advance()` are free (local fields); a thread posts
    changes to the board every `every_s` seconds, so a step costs no Ray call."""

    def __init__(self, board: Any, name: str, every_s: float = 2.0):
        self.board, self.name, self.every_s = board, name, every_s
        self.stage, self.since, self.count = "starting", time.time(), 0
        self._posted: tuple[str, float, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stage-poster-{name}", daemon=True)
        self._thread.start()

    def enter(self, stage: str) -> None:
        if stage != self.stage:
            self.stage, self.since = stage, time.time()

    def advance(self) -> None:
        self.count += 1

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.post()

    def post(self) -> None:
        state = (self.stage, self.since, self.count)
        if state != self._posted:
            try:
                self.board.post.remote(self.name, *state)
                self._posted = state
            except Exception:  # noqa: BLE001 - the board is advisory; training goes on without it
                pass

    def close(self) -> None:
        self._stop.set()
        self.post()
