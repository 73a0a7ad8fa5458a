"""Faults injected into a caption job's Ray workers, from outside the job's code.

A driver started with `job_runtime_env(faults)` (see `driver_environment`) runs `install` in
every worker process of its Ray job (Ray's `worker_process_setup_hook`). `install` patches,
in those processes only, the two places every caption engine of this project goes through:

- `delay`: opening one input shard for reading (`Storage.filesystem(...).open_input_file`)
  sleeps `seconds` first, once per worker process: a shard whose store is slow to answer;
- `poison_value`: `trol.Captioner.caption` ends its process (as a segfault would) whenever a
  batch holds an image whose pixels all equal that value: a batch that kills its actor every
  time it is retried.

Nothing here is imported by the jobs themselves; benchmarks and tests choose the faults.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ENV = "TROL_FAULT_INJECTION"
HOOK = "bench.fault_injection.install"


def job_runtime_env(faults: dict[str, Any], pythonpath: list[str]) -> dict[str, Any]:
    """The Ray job runtime_env that installs `faults` in every worker of the job."""
    return {"worker_process_setup_hook": HOOK,
            "env_vars": {ENV: json.dumps(faults), "PYTHONPATH": os.pathsep.join(pythonpath)}}


def driver_environment(faults: dict[str, Any], pythonpath: list[str]) -> dict[str, str]:
    """Environment variables for a driver process (`python -m jobs.caption ...`) whose Ray job
    carries the faults: Ray reads a job's runtime_env from this variable, as under `ray job submit`."""
    return {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": job_runtime_env(faults, pythonpath)})}


def install() -> None:
    faults = json.loads(os.environ.get(ENV) or "{}")
    if "delay" in faults:
        _delay_shard_reads(faults["delay"]["match"], float(faults["delay"]["seconds"]))
    if "poison_value" in faults:
        _poison_captioner(int(faults["poison_value"]))


def _delay_shard_reads(match: str, seconds: float) -> None:
    from pipelines.storage import Storage

    original = Storage.filesystem
    delayed: set[str] = set()

    class SlowOpen:
        def __init__(self, fs: Any):
            self._fs = fs

        def open_input_file(self, path: str, *args: Any, **kwargs: Any) -> Any:
            if match in path and path not in delayed:
                delayed.add(path)
                print(f"fault injection: delaying the read of {path} by {seconds} s", file=sys.stderr, flush=True)
                time.sleep(seconds)
            return self._fs.open_input_file(path, *args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._fs, name)

    def filesystem(self: Any, *args: Any, **kwargs: Any) -> Any:
        return SlowOpen(original(self, *args, **kwargs))

    Storage.filesystem = filesystem


def _poison_captioner(value: int) -> None:
    import numpy as np
    from trol import inference

    original = inference.Captioner.caption

    def caption(self: Any, pixel_values: list, *args: Any, **kwargs: Any) -> Any:
        for pixels in pixel_values:
            arr = np.asarray(pixels)
            if arr.size and int(arr.min()) == value == int(arr.max()):
                print(f"fault injection: poison image in a batch of {len(pixel_values)}; ending this process",
                      file=sys.stderr, flush=True)
                os._exit(11)
        return original(self, pixel_values, *args, **kwargs)

    inference.Captioner.caption = caption
