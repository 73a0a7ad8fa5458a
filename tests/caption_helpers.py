"""Helpers for caption tests that run the job as its own driver process on the session's Ray."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def tiny_pngs(count: int = 8, side: int = 12) -> list[bytes]:
    """Small distinct PNGs (a colour ramp), cheap to decode by the hundred thousand."""
    out = []
    for i in range(count):
        img = Image.new("RGB", (side, side), (30 * i % 256, 255 - 20 * i % 256, 90))
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def write_many_shards(folder: Path, shards: int, rows: int, start: int = 0) -> int:
    """`shards` Parquet files of `rows` rows (ids "k-i"); returns the rows written."""
    folder.mkdir(parents=True, exist_ok=True)
    images = tiny_pngs()
    for k in range(start, start + shards):
        table = pa.table({"id": [f"{k}-{i}" for i in range(rows)],
                          "image": pa.array([images[(k + i) % len(images)] for i in range(rows)], pa.binary())})
        pq.write_table(table, folder / f"part-{k:05d}.parquet", compression="none")
    return shards * rows


def ray_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def driver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a driver process that joins the session's Ray."""
    env = dict(os.environ)
    env["RAY_ADDRESS"] = ray_address()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def write_spec(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def start_driver(spec_path: Path, *args: str, env: dict[str, str] | None = None, log: Path | None = None,
                 ) -> subprocess.Popen:
    out = open(log, "wb") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "jobs.caption", str(spec_path), *args], cwd=REPO,
                            env=env or driver_env(), stdout=out, stderr=subprocess.STDOUT)


def wait_for_exit(proc: subprocess.Popen, timeout: float) -> int:
    """The child's exit status; past `timeout` it is killed (and the status says so)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(30)
