"""Where a job's Ray comes from: the cluster it was submitted to, or a private local one."""

from __future__ import annotations

import os


def ensure_ray() -> None:
    """Join the cluster this job was submitted to (or one started with `ray start`);
    otherwise start a private local Ray without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    try:
        ray.init(address="auto")
    except ConnectionError:
        ray.init(address="local", include_dashboard=False)
