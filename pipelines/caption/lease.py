"""One run at a time per output: a lease object with an expiry, taken over from dead runs.

A run writes `_LEASE.json` (its run id, host, pid and the pid's start time, its Ray job and
cluster once it has joined Ray, and an expiry) before it starts, renews it while it works
and removes it when it ends. Another run that finds an unexpired lease of someone else
refuses to start, unless the holder is provably dead:

- it ran on this host and its process is gone (the pid is free, or now belongs to a
  process that started later);
- it ran on the Ray cluster this run has joined and its Ray job is no longer running.

Then it takes over and says so. Otherwise a lease left by a killed run expires by itself,
and `--force` takes over at once. S3 has no compare-and-swap that every S3-compatible store
offers, so two runs starting within the same second could both win; the lease is read back
after writing to narrow that window. Outputs stay correct even then (each shard is one
atomic PUT); the lease prevents the wasted double work and confusing summaries.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..specs import SpecError
from ..storage import Location, Storage, StorageError

LEASE = "_LEASE.json"
log = logging.getLogger(__name__)

# Who holds a lease: how to tell later whether that run is still alive.
Holder = dict[str, Any]
# A check that a lease's holder is dead: the proof in words, or None when it may be alive.
DeathCheck = Callable[[Holder], "str | None"]


class OutputLockedError(SpecError):
    """Another run holds the output's lease."""


def process_start_ticks(pid: int) -> int | None:
    """When a live process started (clock ticks after boot, Linux), or None if it is gone
    (or a zombie). With the pid this names one process for good: a reused pid starts later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def this_holder(ray_info: dict[str, str] | None = None) -> Holder:
    pid = os.getpid()
    holder: Holder = {"host": socket.gethostname(), "pid": pid, "pid_start": process_start_ticks(pid)}
    holder.update(ray_info or {})
    return holder


def dead_on_this_host(held: Holder) -> str | None:
    """Proof that the holder ran on this host and its process is gone, else None."""
    pid = held.get("pid")
    if held.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return None
    gone = f"its process {pid} on this host ({held['host']}) is gone"
    if os.path.isdir("/proc"):
        start = process_start_ticks(pid)
        if start is None:
            return gone
        if held.get("pid_start") is not None and start != held["pid_start"]:
            return f"{gone} (the pid now belongs to a later process)"
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return gone
    except PermissionError:  # alive, another user's
        return None
    return None


def ray_holder_info() -> dict[str, str]:
    """This process's Ray job and cluster, once it has joined Ray (else nothing)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return {}
    context = ray.get_runtime_context()
    return {"ray_job": context.get_job_id(), "ray_cluster": context.get_session_name()}


def dead_ray_job(held: Holder) -> str | None:
    """Proof that the holder's Ray job ran on the cluster this process has joined and has
    ended (its driver exited or was killed), else None. Never imports Ray itself."""
    ray = sys.modules.get("ray")
    if not held.get("ray_job") or ray is None or not ray.is_initialized():
        return None
    try:
        if held.get("ray_cluster") != ray.get_runtime_context().get_session_name():
            return None
        from ray._private import state  # the job table; the public state API needs the dashboard

        job = next((j for j in state.jobs() if j["JobID"] == held["ray_job"]), None)
    except Exception:  # noqa: BLE001 - no proof, no takeover
        return None
    if job is not None and job["IsDead"]:
        return f"its Ray job {held['ray_job']} on this cluster has ended"
    return None


def holder_is_dead(held: Holder) -> str | None:
    return dead_on_this_host(held) or dead_ray_job(held)


def read_lease(storage: Storage, output: Location) -> dict[str, Any] | None:
    try:
        lease = storage.read_json(output.join(LEASE))
    except (StorageError, ValueError):
        return None
    return lease if isinstance(lease, dict) else None


def acquire_lease(storage: Storage, output: Location, run_id: str, seconds: float, *, force: bool = False,
                  now: float | None = None, holder: Holder | None = None,
                  is_dead: DeathCheck | None = holder_is_dead) -> str | None:
    """Take the output for `run_id`, or raise OutputLockedError naming the holder. Returns
    a sentence when it took over from another run (forced, or its holder is dead)."""
    now = time.time() if now is None else now
    held = read_lease(storage, output)
    took_over = None
    if held and held.get("run_id") != run_id and float(held.get("expires_at", 0)) > now:
        who = f"run {held.get('run_id')} on {held.get('holder', 'an unknown host')}"
        proof = is_dead(held) if is_dead is not None else None
        if proof:
            took_over = f"took over {output.uri} from {who}: {proof}"
        elif force:
            took_over = f"took over {output.uri} from {who} (--force)"
        else:
            left = float(held["expires_at"]) - now
            raise OutputLockedError("output", f"{output.uri} is in use by {who} (lease expires in {left:.0f} s); "
                                    "wait for it to finish, or pass --force if that run is dead")
    write_lease(storage, output, run_id, seconds, now=now, holder=holder)
    mine = read_lease(storage, output)
    if not mine or mine.get("run_id") != run_id:
        raise OutputLockedError("output", f"{output.uri}: another run took the lease at the same moment "
                                f"({(mine or {}).get('run_id')}); try again later")
    if took_over:
        log.warning("%s", took_over)
    return took_over


def write_lease(storage: Storage, output: Location, run_id: str, seconds: float, *, now: float | None = None,
                holder: Holder | None = None) -> None:
    now = time.time() if now is None else now
    who = holder or this_holder(ray_holder_info())
    storage.write_json(output.join(LEASE), {
        "run_id": run_id, "holder": f"{who['host']}:{who['pid']}", **who, "renewed_at": now, "expires_at": now + seconds})


def release_lease(storage: Storage, output: Location, run_id: str) -> None:
    """Remove the lease if it is still ours (a takeover may have replaced it)."""
    held = read_lease(storage, output)
    if held and held.get("run_id") == run_id:
        try:
            storage.delete(output.join(LEASE))
        except StorageError as exc:
            log.warning("could not remove the lease (it expires by itself): %s", exc)


class LeaseKeeper:
    """Renews a run's lease at once (with what it knows now, e.g. its Ray job) and then
    every third of its length, in a background thread."""

    def __init__(self, storage: Storage, output: Location, run_id: str, seconds: float, holder: Holder | None = None):
        self.storage, self.output, self.run_id, self.seconds = storage, output, run_id, seconds
        self.holder = holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="caption-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        release_lease(self.storage, self.output, self.run_id)

    def renew(self) -> None:
        """Write the lease now (e.g. once this run has joined Ray, so it names its Ray job)."""
        self._write()

    def _write(self) -> None:
        try:
            write_lease(self.storage, self.output, self.run_id, self.seconds, holder=self.holder)
        except StorageError as exc:  # the store may be briefly down; the lease lasts a while
            log.warning("could not renew the output lease: %s", exc)

    def _renew(self) -> None:
        while not self._stop.wait(max(0.5, self.seconds / 3)):
            self._write()
