"""The caption job under stress, measured from outside: a slow shard, many shards, faults.

Every scenario runs the job the way users do, `python -m jobs.caption SPEC.yaml` as its own
driver process joined to a private local Ray, and reads only what the job writes (exit
status, outputs, `_SUMMARY.json`). Faults come from outside the job's code
(`bench.fault_injection`, signals, stopping the S3 server), so the same script measures any
engine of this project: copy `bench/` into another checkout and run it there.

    python -m bench.caption_faults [--scenario NAME ...] [--size tiny|small]

- delay: one shard's reads stall 10 s; images/s against the same run without the stall;
- scale: driver peak RSS at 300 and 600 shards (100,200 rows each time);
- kill-actor: the predictor actor SIGKILLed after the first commit; rows and time;
- kill-driver: the driver SIGKILLed after the first commit, then the same command again
  (without --force): does it take over, and how long until every shard is committed;
- s3-outage: the S3 server stopped for 5 s mid-run and restarted;
- poison: one image kills its actor whenever captioned: time until its shard fails;
- bad-model: a model folder whose weights cannot load: time until the job exits.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from PIL import Image

from .common import median, note, parse_args, print_machine, ratio, result
from .data import write_image_shards
from .fault_injection import driver_environment
from .models import save_model

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = ("delay", "scale", "kill-actor", "kill-driver", "s3-outage", "poison", "bad-model")
POISON = 13  # a solid image of this grey value kills the captioning process (fault_injection)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scenario", action="append", choices=SCENARIOS + ("all",), default=None)
    parser.add_argument("--delay-s", type=float, default=10.0)
    parser.add_argument("--workdir", default=None, help="keep inputs and outputs here (default: a temp folder)")


class Bench:
    def __init__(self, work: Path, size: str):
        import ray

        self.work, self.size = work, size
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        self.address = ray.get_runtime_context().gcs_address
        self.tiny = save_model("tiny", work / "tiny-model", eos_reachable=False)
        self.model = self.tiny if size == "tiny" else save_model(size, work / f"{size}-model", eos_reachable=False)

    def env(self, faults: dict | None = None, extra: dict | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_JOB_CONFIG_JSON_ENV_VAR"}
        env.update({"RAY_ADDRESS": self.address, "PYTHONPATH": str(REPO), **(extra or {})})
        if faults:
            env.update(driver_environment(faults, [str(REPO)]))
        return env

    def spec(self, name: str, inputs: Path, **fields) -> Path:
        spec = {"input": str(inputs), "output": str(self.work / name / "out"), "model": str(self.tiny),
                "id_columns": ["id"], "dtype": "float32", "batch_size": 4, "generation": {"max_new_tokens": 4},
                "actors": 1, "gpus_per_actor": 0, **fields}
        path = self.work / name / "spec.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(spec))
        return path

    def start(self, spec: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(spec.parent / f"driver-{time.monotonic_ns()}.log", "wb")
        return subprocess.Popen([sys.executable, "-m", "jobs.caption", str(spec), "--progress-every", "5", *args],
                                cwd=REPO, env=env or self.env(), stdout=log, stderr=subprocess.STDOUT)

    def run(self, spec: Path, *args: str, env: dict | None = None, timeout: float = 1200) -> tuple[int, float]:
        started = time.perf_counter()
        proc = self.start(spec, *args, env=env)
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = proc.wait()
        return status, time.perf_counter() - started


def summary_of(spec: Path) -> dict:
    out = Path(yaml.safe_load(spec.read_text())["output"])
    return json.loads((out / "_SUMMARY.json").read_text())


def committed(spec: Path) -> int:
    out = Path(yaml.safe_load(spec.read_text())["output"])
    return len(list((out / "_stats").glob("*.json"))) if (out / "_stats").is_dir() else 0


def output_ids(spec: Path) -> list[str]:
    out = Path(yaml.safe_load(spec.read_text())["output"])
    return [i for p in sorted(out.glob("*.parquet")) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def input_ids(folder: Path) -> list[str]:
    return [i for p in sorted(folder.glob("*.parquet")) for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]


def wait_until(condition, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
            raise RuntimeError("the job ended or timed out before the fault could be injected")
        time.sleep(0.05)


def predictor_pids() -> list[int]:
    from ray._private import state

    return [info["Pid"] for info in state.actors().values()
            if "CaptionPredictor" in str(info.get("ActorClassName")) and info.get("State") == "ALIVE" and info.get("Pid")]


def exact(ids: list[str], expected: list[str]) -> int:
    """1 when the outputs hold every input row exactly once, else 0."""
    return int(sorted(ids) == sorted(expected) and len(ids) == len(set(ids)))


# --- scenarios ------------------------------------------------------------------------------


def delay(b: Bench, seconds: float) -> None:
    """8 shards; the third one's read stalls. Runs alternate delayed / not, after a warm-up."""
    inputs = b.work / "delay-in"
    images = 96 if b.size == "small" else 64
    write_image_shards(inputs, images, 8)
    fields = {"model": str(b.model), "batch_size": 8 if b.size == "small" else 4,
              "generation": {"max_new_tokens": 16 if b.size == "small" else 4}}
    b.run(b.spec("delay-warm", inputs, **fields))
    rates: dict[str, list[float]] = {"plain": [], "delayed": []}
    idle_bound = []
    for r in range(2):
        for kind in (("plain", "delayed") if r % 2 == 0 else ("delayed", "plain")):
            faults = {"delay": {"match": "part-00002", "seconds": seconds}} if kind == "delayed" else None
            spec = b.spec(f"delay-{kind}-{r}", inputs, **fields)
            status, secs = b.run(spec, env=b.env(faults))
            if status != 0 or exact(output_ids(spec), input_ids(inputs)) != 1:
                raise RuntimeError(f"delay scenario: {kind} run exited {status} or lost rows")
            rates[kind].append(images / secs)
            if kind == "plain":
                idle_bound.append(images / (secs + seconds))
    plain, delayed = median(rates["plain"]), median(rates["delayed"])
    result("delay_images_per_s_plain", plain, "images/s")
    result("delay_images_per_s_delayed", delayed, "images/s")
    result("delay_throughput_delayed_over_plain", ratio(delayed, plain), "x")
    result("delay_ratio_if_the_stall_idled_everything", ratio(median(idle_bound), plain), "x")


def _write_many(folder: Path, shards: int, rows: int) -> int:
    """`shards` Parquet files of `rows` tiny PNG rows (ids "k-i"), cheap to decode."""
    folder.mkdir(parents=True, exist_ok=True)
    pngs = []
    for i in range(8):
        buf = io.BytesIO()
        Image.new("RGB", (12, 12), (30 * i % 256, 255 - 20 * i % 256, 90)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for k in range(shards):
        table = pa.table({"id": [f"{k}-{i}" for i in range(rows)],
                          "image": pa.array([pngs[(k + i) % len(pngs)] for i in range(rows)], pa.binary())})
        pq.write_table(table, folder / f"part-{k:05d}.parquet", compression="none")
    return shards * rows


def scale_rss(b: Bench) -> None:
    fields = {"batch_size": 512, "generation": {"max_new_tokens": 1}, "max_open_shards": 4}
    for shards, rows in ((300, 334), (600, 167)):
        inputs = b.work / f"scale-{shards}-in"
        total = _write_many(inputs, shards, rows)
        spec = b.spec(f"scale-{shards}", inputs, **fields)
        status, secs = b.run(spec)
        summary = summary_of(spec)
        if status != 0 or summary["rows_out"] != total:
            raise RuntimeError(f"scale {shards}: exit {status}, {summary.get('rows_out')} of {total} rows")
        result(f"scale_{shards}_shards_driver_peak_rss_mib", summary["driver_peak_rss_mib"], "MiB")
        result(f"scale_{shards}_shards_seconds", secs, "s")
        result(f"scale_{shards}_shards_images_per_s", total / secs, "images/s")


def kill_actor(b: Bench) -> None:
    inputs = b.work / "kill-actor-in"
    write_image_shards(inputs, 240, 8)
    fields = {"batch_size": 2, "max_open_shards": 2, "generation": {"max_new_tokens": 8}}
    clean = b.spec("kill-actor-clean", inputs, **fields)
    _, clean_s = b.run(clean)
    spec = b.spec("kill-actor", inputs, **fields)
    started = time.perf_counter()
    proc = b.start(spec)
    wait_until(lambda: committed(spec) >= 1, 300, proc)
    pids = predictor_pids()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    status = proc.wait(600)
    secs = time.perf_counter() - started
    result("kill_actor_exit_status", status, "code")
    result("kill_actor_rows_exact", exact(output_ids(spec), input_ids(inputs)), "bool")
    result("kill_actor_seconds", secs, "s")
    result("kill_actor_seconds_clean_run", clean_s, "s")
    note(f"kill-actor: killed {len(pids)} predictor process(es) after the first commit")


def kill_driver(b: Bench) -> None:
    inputs = b.work / "kill-driver-in"
    write_image_shards(inputs, 192, 8)
    spec = b.spec("kill-driver", inputs, batch_size=4, max_open_shards=1, generation={"max_new_tokens": 6})
    proc = b.start(spec)
    wait_until(lambda: committed(spec) >= 1, 300, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter()
    status, secs = b.run(spec, timeout=900)
    took_over = status == 0
    result("kill_driver_rerun_exit_status", status, "code")
    if status == 4:  # refused while the dead driver's lease lasts: what --force was for
        status, more = b.run(spec, "--force", timeout=900)
        secs += more
    result("kill_driver_rerun_took_over_by_itself", int(took_over), "bool")
    result("kill_driver_seconds_from_kill_to_complete", time.perf_counter() - killed_at, "s")
    result("kill_driver_final_exit_status", status, "code")
    result("kill_driver_rows_exact", exact(output_ids(spec), input_ids(inputs)), "bool")


def s3_outage(b: Bench) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from s3server import restart_s3_server, start_s3_server

    server = start_s3_server(b.work / "weed")
    try:
        client = server.client()
        client.create_bucket(Bucket="outage")
        local = b.work / "outage-in"
        write_image_shards(local, 160, 8)
        for path in sorted(local.glob("*.parquet")):
            client.upload_file(str(path), "outage", f"in/{path.name}")
        spec_path = b.spec("s3-outage", local, input="s3://outage/in/", output="s3://outage/out",
                           storage={"endpoint_url": server.endpoint_url}, batch_size=2, max_open_shards=2,
                           generation={"max_new_tokens": 8}, transient_retries=5)
        creds = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key,
                 "AWS_REGION": server.region}

        def stats() -> int:
            return client.list_objects_v2(Bucket="outage", Prefix="out/_stats/").get("KeyCount", 0)

        started = time.perf_counter()
        proc = b.start(spec_path, env=b.env(extra=creds))
        wait_until(lambda: stats() >= 1, 300, proc)
        server.stop()
        time.sleep(5)
        server = restart_s3_server(server)
        client = server.client()
        first = proc.wait(900)
        result("s3_outage_first_run_exit_status", first, "code")
        result("s3_outage_first_run_seconds", time.perf_counter() - started, "s")
        if first != 0:
            again, secs = b.run(spec_path, env=b.env(extra=creds))
            result("s3_outage_rerun_exit_status", again, "code")
            result("s3_outage_rerun_seconds", secs, "s")
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="outage", Prefix="out/")["Contents"]
                if o["Key"].endswith(".parquet") and "/_stats/" not in o["Key"]]
        ids = [i for k in sorted(keys) for i in pq.read_table(
            pa.BufferReader(client.get_object(Bucket="outage", Key=k)["Body"].read())).column("id").to_pylist()]
        result("s3_outage_rows_exact", exact(ids, input_ids(local)), "bool")
    finally:
        server.stop()


def poison(b: Bench) -> None:
    inputs = b.work / "poison-in"
    write_image_shards(inputs, 96, 4)
    bad = inputs / "part-00001.parquet"
    table = pq.read_table(bad)
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (POISON,) * 3).save(buf, format="PNG")
    images = table.column("image").to_pylist()
    images[5] = buf.getvalue()
    pq.write_table(table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary())), bad)
    spec = b.spec("poison", inputs, transient_retries=2)
    status, secs = b.run(spec, env=b.env({"poison_value": POISON}), timeout=900)
    summary = summary_of(spec) if (Path(yaml.safe_load(spec.read_text())["output"]) / "_SUMMARY.json").exists() else {}
    result("poison_exit_status", status, "code")
    result("poison_seconds", secs, "s")
    result("poison_shards_failed", summary.get("shards_failed", -1), "shards")
    result("poison_shards_committed", summary.get("shards_committed", -1), "shards")
    note(f"poison: failed shards and reasons: {summary.get('failed')}")


def bad_model(b: Bench) -> None:
    inputs = b.work / "bad-model-in"
    write_image_shards(inputs, 16, 2)
    model = b.work / "bad-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text((b.tiny / "config.json").read_text())
    for name in os.listdir(b.tiny):
        if name != "config.json" and not name.endswith(".safetensors"):
            (model / name).write_bytes((b.tiny / name).read_bytes())
    (model / "model.safetensors").write_bytes(b"these are not weights")
    status, secs = b.run(b.spec("bad-model", inputs, model=str(model)), timeout=600)
    result("bad_model_exit_status", status, "code")
    result("bad_model_seconds_to_exit", secs, "s")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], add_arguments, argv)
    chosen = SCENARIOS if not args.scenario or "all" in args.scenario else tuple(args.scenario)
    print_machine("cpu", "float32", size=args.size, scenarios=",".join(chosen))
    with tempfile.TemporaryDirectory(prefix="bench-caption-faults-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        b = Bench(work, args.size)
        for name in chosen:
            note(f"{name}: load {os.getloadavg()[0]:.2f} at start")
            {"delay": lambda: delay(b, args.delay_s), "scale": lambda: scale_rss(b), "kill-actor": lambda: kill_actor(b),
             "kill-driver": lambda: kill_driver(b), "s3-outage": lambda: s3_outage(b), "poison": lambda: poison(b),
             "bad-model": lambda: bad_model(b)}[name]()
        note(f"load {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
