"""Where a job's Ray comes from, and how quiet it is.

A job joins a cluster only when told to:
- `ray job submit` sets RAY_ADDRESS for the entrypoint, so a submitted job joins its cluster;
- `--address ADDR` (every job takes it), or RAY_ADDRESS in the environment: `host:port`,
  `ray://host:port`, or `auto` for a cluster started with `ray start` on this machine.
Otherwise the job starts a private Ray on this machine, used by nothing else and gone when
the job ends. `ray.init(address="auto")` is never tried implicitly: it joins whatever Ray
runs here, including another job's private one, and two jobs then starve each other.

A private Ray is a single node no autoscaler drains, so Ray Train's preemption watcher can
only log about itself there and is off. It runs the dashboard on loopback: Ray Train's
placement-group cleaner polls the State API, which the dashboard serves (without it, the
cleaner logs a warning every second). ray.init's INFO lines are kept out of the job's
output (the job prints where it runs); Ray's warnings and errors still come through.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

@dataclass(frozen=True)
class RaySession:
    """What `ensure_ray` connected to, for the job's first line."""

    kind: str  # "private" (started by this job), "cluster" (joined), "running" (initialised before)
    address: str
    cpus: float
    dashboard_url: str | None

    def describe(self) -> str:
        where = {"private": "a private local Ray", "cluster": f"the Ray cluster at {self.address}",
                 "running": f"the Ray already running in this process ({self.address})"}[self.kind]
        dashboard = f", dashboard http://{self.dashboard_url}" if self.dashboard_url else ""
        return f"{where} ({self.cpus:g} CPUs{dashboard})"


_started_kind: str | None = None  # what this process's ensure_ray started or joined


def ensure_ray(address: str | None = None) -> RaySession:
    """Join `address` (or RAY_ADDRESS when set); otherwise start a private local Ray.
    Already initialised (tests, the demo's second stage): keep that Ray."""
    import ray

    global _started_kind
    target = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():  # the demo's second stage says "private" too, when it was ours
        kind = _started_kind or "running"
    elif target:
        # logging_level: the driver's "ray" logger; ray.init's INFO lines are ours to replace.
        ray.init(address=target, logging_level=logging.WARNING)
        kind = _started_kind = "cluster"
    else:
        _start_private_ray()
        kind = _started_kind = "private"
    return RaySession(kind=kind, address=ray.get_runtime_context().gcs_address,
                      cpus=ray.cluster_resources().get("CPU", 0.0), dashboard_url=_dashboard_url())


def _start_private_ray(attempts: int = 3) -> None:
    import ray

    # Ray announces at WARNING that a new local cluster uses token auth, its default; that
    # is no news for a private Ray (its other warnings, e.g. auth disabled, still show).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    for attempt in range(attempts):
        port = _free_port()
        # Without an address, Ray's State API finds "the latest cluster started on this
        # machine", which may be another job's private Ray: Train's placement-group cleaner
        # would then look for our controller there, find nothing, and remove our workers'
        # placement group. Every process of this job asks our own dashboard instead.
        env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
               # Actors loading a model write to a log, not a terminal: no tqdm bars.
               "HF_HUB_DISABLE_PROGRESS_BARS": os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "1")}
        try:
            ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                     logging_level=logging.WARNING, runtime_env={"env_vars": env})
        except ValueError as exc:  # the port was taken between choosing and binding it
            if "already occupied" not in str(exc) or attempt == attempts - 1:
                raise
            continue
        os.environ.update(env)  # the driver's own State API calls, and Train's controller (propagated)
        return


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dashboard_url() -> str | None:
    import ray

    try:
        return ray._private.worker.get_dashboard_url() or None  # "host:port"; empty without a dashboard
    except Exception:  # noqa: BLE001 - only decorates the job's first line
        return None
