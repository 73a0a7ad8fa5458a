"""One run at a time per output: a lease object with an expiry.

A run writes `_LEASE.json` (its run id, host, pid and an expiry) before it starts, renews it
while it works and removes it when it ends. Another run that finds an unexpired lease of
someone else refuses to start; a lease left by a run that was killed expires by itself,
and `--force` takes over at once. S3 has no compare-and-swap that every S3-compatible
store offers, so two runs starting within the same second could both win; the lease is
read back after writing to narrow that window. Outputs stay correct even then (each shard
is one atomic PUT); the lease prevents the wasted double work and confusing summaries.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from .specs import SpecError
from .storage import Location, Storage, StorageError

LEASE = "_LEASE.json"
log = logging.getLogger(__name__)


class OutputLockedError(SpecError):
    """Another run holds the output's lease."""


def read_lease(storage: Storage, output: Location) -> dict[str, Any] | None:
    try:
        lease = storage.read_json(output.join(LEASE))
    except (StorageError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def acquire_lease(storage: Storage, output: Location, run_id: str, seconds: float, *, force: bool = False,
                  now: float | None = None) -> None:
    """Take the output for `run_id`, or raise OutputLockedError naming the holder."""
    now = time.time() if now is None else now
    held = read_lease(storage, output)
    if held and held.get("run_id") != run_id and float(held.get("expires_at", 0)) > now and not force:
        left = float(held["expires_at"]) - now
        raise OutputLockedError("output", f"{output.uri} is in use by run {held.get('run_id')} on "
                                f"{held.get('holder', 'an unknown host')} (lease expires in {left:.0f} s); wait for "
                                "it to finish, or pass --force if that run is dead")
    write_lease(storage, output, run_id, seconds, now=now)
    mine = read_lease(storage, output)
    if not mine or mine.get("run_id") != run_id:
        raise OutputLockedError("output", f"{output.uri}: another run took the lease at the same moment "
                                f"({(mine or {}).get('run_id')}); try again later")


def write_lease(storage: Storage, output: Location, run_id: str, seconds: float, *, now: float | None = None) -> None:
    now = time.time() if now is None else now
    storage.write_json(output.join(LEASE), {"run_id": run_id, "holder": f"{socket.gethostname()}:{os.getpid()}",
                                            "renewed_at": now, "expires_at": now + seconds})


def release_lease(storage: Storage, output: Location, run_id: str) -> None:
    """Remove the lease if it is still ours (a --force takeover may have replaced it)."""
    held = read_lease(storage, output)
    if held and held.get("run_id") == run_id:
        try:
            storage.delete(output.join(LEASE))
        except StorageError as exc:
            log.warning("could not remove the lease (it expires by itself): %s", exc)


class LeaseKeeper:
    """Renews a run's lease every third of its length, in a background thread."""

    def __init__(self, storage: Storage, output: Location, run_id: str, seconds: float):
        self.storage, self.output, self.run_id, self.seconds = storage, output, run_id, seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="caption-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        release_lease(self.storage, self.output, self.run_id)

    def _renew(self) -> None:
        while not self._stop.wait(max(0.5, self.seconds / 3)):
            try:
                write_lease(self.storage, self.output, self.run_id, self.seconds)
            except StorageError as exc:  # the store may be briefly down; the lease lasts a while
                log.warning("could not renew the output lease: %s", exc)
