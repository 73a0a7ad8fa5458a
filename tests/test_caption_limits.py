"""Runs that must end by themselves, with a reason, in bounded time: a poison batch that
kills its actor every time (its shard fails, the others commit), a model that cannot load
(exit 3), a predictor the cluster can never place (the no-progress watchdog, exit 3 saying
what it waited for). And a lease whose holder's Ray job has ended is taken over."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.fault_injection import driver_environment
from caption_helpers import REPO, driver_env, start_driver, wait_for_exit, write_spec
from pipelines.caption import RunAborted, run_caption
from pipelines.specs import CaptionSpec, build_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

FAST = {"dtype": "float32", "id_columns": ["id"], "batch_size": 4, "generation": {"max_new_tokens": 2}}
POISON = 13


def solid_png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (value,) * 3).save(buf, format="PNG")
    return buf.getvalue()


def write_inputs(folder: Path, shards: int, rows: int, poison_at: tuple[int, int] | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(shards):
        images = [solid_png(40 + (k * rows + i) % 150) for i in range(rows)]
        if poison_at and poison_at[0] == k:
            images[poison_at[1]] = solid_png(POISON)
        pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(rows)], "image": pa.array(images, pa.binary())}),
                       folder / f"part-{k}.parquet")


def test_a_poison_batch_fails_its_shard_with_the_reason_and_the_others_commit(tiny_model: Path, tmp_path: Path):
    write_inputs(tmp_path / "in", 3, 8, poison_at=(1, 5))
    spec = write_spec(tmp_path / "spec.yaml", {**FAST, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                               "model": str(tiny_model), "transient_retries": 0})
    env = driver_env(driver_environment({"poison_value": POISON}, [str(REPO)]))
    started = time.monotonic()
    status = wait_for_exit(start_driver(spec, env=env, log=tmp_path / "driver.log"), timeout=600)
    seconds = time.monotonic() - started
    log = (tmp_path / "driver.log").read_text()
    assert status == 1, log[-3000:]  # partial: the other shards are committed
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["shards_committed"] == 2 and list(summary["failed"]) == [str(tmp_path / "in" / "part-1.parquet")]
    assert "died 1 time while captioning" in summary["failed"][str(tmp_path / "in" / "part-1.parquet")]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.parquet")) == ["part-0.parquet", "part-2.parquet"]
    print(f"poison batch: the run ended in {seconds:.0f} s")


def test_a_model_that_cannot_load_exits_3_quickly(tiny_model: Path, tmp_path: Path) -> None:
    write_inputs(tmp_path / "in", 2, 4)
    model = tmp_path / "broken-model"
    model.mkdir()
    for f in tiny_model.iterdir():
        (model / f.name).write_bytes(b"not weights" if f.suffix == ".safetensors" else f.read_bytes())
    spec = write_spec(tmp_path / "spec.yaml", {**FAST, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                               "model": str(model)})
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "jobs.caption", str(spec)], cwd=REPO, env=driver_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "caption: aborted" in proc.stderr and "the predictor could not start" in proc.stderr
    assert time.monotonic() - started < 120
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["status"] == "aborted" and "could not start" in summary["aborted"]
    assert not (tmp_path / "out" / "_LEASE.json").exists()


def test_the_watchdog_ends_a_run_that_cannot_move_and_says_what_it_waits_for(tiny_model: Path, tmp_path: Path):
    write_inputs(tmp_path / "in", 2, 4)
    spec = build_spec(CaptionSpec, {**FAST, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                    "model": str(tiny_model), "cpus_per_actor": 64, "stall_timeout_s": 5})
    started = time.monotonic()
    with pytest.raises(RunAborted) as err:
        run_caption(spec)
    message = str(err.value)
    assert "stall_timeout_s" in message and "CaptionPredictor" in message and "1 × {'CPU': 64.0}" in message, message
    assert time.monotonic() - started < 90
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["status"] == "aborted" and summary["shards_failed"] == 2


def test_a_lease_whose_ray_job_has_ended_is_taken_over(tmp_path: Path) -> None:
    import ray

    from pipelines.caption.lease import acquire_lease, read_lease
    from pipelines.storage import Location, Storage

    code = "import ray; ray.init(); print('JOB', ray.get_runtime_context().get_job_id())"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=driver_env(), capture_output=True, text=True,
                          timeout=120)
    ended = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("JOB"))
    st, out = Storage(), Location("file", str(tmp_path / "out"))
    session = ray.get_runtime_context().get_session_name()
    elsewhere = {"host": "another-host", "pid": 1, "pid_start": 1, "ray_cluster": session}
    acquire_lease(st, out, "live", 600, holder={**elsewhere, "ray_job": ray.get_runtime_context().get_job_id()})
    with pytest.raises(Exception, match="in use by run live"):  # this very job is running
        acquire_lease(st, out, "next", 600)
    acquire_lease(st, out, "dead", 600, holder={**elsewhere, "ray_job": ended}, force=True)
    took = acquire_lease(st, out, "next", 600)
    assert took and f"its Ray job {ended} on this cluster has ended" in took
    assert read_lease(st, out)["run_id"] == "next"
    acquire_lease(st, out, "other-cluster", 600, holder={**elsewhere, "ray_job": ended, "ray_cluster": "x"}, force=True)
    with pytest.raises(Exception, match="in use by run other-cluster"):  # no proof about another cluster's jobs
        acquire_lease(st, out, "next2", 600)
