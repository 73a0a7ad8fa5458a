"""Progress lines for the caption job: shards done / total and rows/s, every few seconds.

Under `ray job submit` there is no terminal, so the job's log (`ray job logs`, the
dashboard) is how a user follows a run. The lines come from what is durably done: a
shard counts once its stats object (the commit marker) exists in the output, so the
numbers never run ahead of what a rerun would skip. Reading only the plan and the output
listing keeps this apart from how the pipeline itself is built.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pipelines.caption import STATS_DIR
from pipelines.storage import StorageError


class CaptionProgress:
    """Prints a progress line now, every `interval_s` seconds while running, and at exit."""

    def __init__(self, plan: Any, interval_s: float, emit: Callable[[str], None] | None = None):
        self.plan = plan
        self.interval_s = interval_s
        self.emit = emit or (lambda line: print(line, flush=True))
        self.rows_by_marker = {shard.stats.path: shard.rows for shard in plan.todo}
        self.shards_before = len(plan.shards) - len(plan.todo)  # finished by an earlier run
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caption-progress", daemon=True)

    def __enter__(self) -> CaptionProgress:
        self.report()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 30)
        self.report()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.report()

    def report(self) -> None:
        try:
            markers = self.plan.storage.list_files(self.plan.output.join(STATS_DIR))
        except StorageError as exc:  # a slow or flaky listing must never fail the job itself
            self.emit(f"caption progress: listing the output failed ({exc}); still running")
            return
        done = [self.rows_by_marker[m.path] for m in markers if m.path in self.rows_by_marker]
        elapsed = time.monotonic() - self.started
        rows_total = sum(self.rows_by_marker.values())
        self.emit(
            f"caption progress: {self.shards_before + len(done)}/{len(self.plan.shards)} shards done, "
            f"{sum(done)}/{rows_total} rows this run, {sum(done) / max(elapsed, 1e-9):.1f} rows/s, "
            f"{elapsed:.0f} s elapsed"
        )
