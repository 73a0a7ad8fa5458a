"""`ray job submit` end to end, as a user runs it, on a real two-node Ray cluster.

Two `ray start` nodes on loopback (tests/raycluster.py) and the SeaweedFS S3 server. The
nodes carry the S3 settings in their environment, as cluster nodes carry an instance role;
nothing secret goes into a spec, the runtime_env or the command line. Three jobs, each
submitted with the `ray job submit` CLI and `--working-dir` (this checkout):

1. prepare digits into S3;
2. fine-tune a tiny TroL with 2 workers that land on different nodes (each node fits one),
   checkpoints and model on S3;
3. caption the held-out digits with 2 predictor actors that load that model from S3.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raycluster import LocalRayCluster, processes_with_marker

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(s3_env) -> Iterator[LocalRayCluster]:
    # 3 CPUs per node: one 2-CPU training worker per node (so the two cannot share a node)
    # and a CPU left on each for Ray Data's read tasks.
    ray_cluster = LocalRayCluster(bin_dir=BIN, cpus_per_node=3, extra_env={
        "AWS_ENDPOINT_URL": s3_env.endpoint_url,
        # Ray Train's controller polls workers every 2 s by default; each report waits for it.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
        # Ray Data hands batches to whichever predictor actor is up first; the tiny model then
        # captions everything in under a second. Waiting for both makes "both actors worked"
        # a property of the job, not of which node loaded the model faster.
        "RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300",
    })
    try:
        ray_cluster.start()
        yield ray_cluster
    finally:
        survivors = ray_cluster.stop()
        assert survivors == [], f"cluster processes still running after stop: {survivors}"
    assert processes_with_marker(ray_cluster.marker) == []


def submit(cluster: LocalRayCluster, submission_id: str, *entrypoint: str) -> None:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", cluster.dashboard_url, "--submission-id", submission_id,
           "--no-wait", "--runtime-env", "cluster/runtime_env.yaml", "--working-dir", str(REPO),
           "--", "python", *entrypoint]
    done = subprocess.run(cmd, cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"ray job submit failed:\n{done.stdout}\n{done.stderr}"


def job_logs(cluster: LocalRayCluster, submission_id: str) -> str:
    cmd = [str(BIN / "ray"), "job", "logs", submission_id, "--address", cluster.dashboard_url]
    done = subprocess.run(cmd, cwd=REPO, env=cluster.env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"ray job logs failed:\n{done.stderr}"
    return done.stdout


def wait_succeeded(cluster: LocalRayCluster, submission_id: str, timeout_s: float) -> str:
    """Poll the job REST API until the job ends; return its logs, which must show success."""
    deadline = time.monotonic() + timeout_s
    status = "PENDING"
    while time.monotonic() < deadline:
        status = cluster.get_json(f"/api/jobs/{submission_id}", timeout=10)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(1.0)
    logs = job_logs(cluster, submission_id)
    assert status == "SUCCEEDED", f"job {submission_id} is {status} after up to {timeout_s} s; logs:\n{logs[-6000:]}"
    return logs


def actors_of_class(cluster: LocalRayCluster, class_name: str) -> list[dict]:
    query = urllib.parse.urlencode({"detail": "1", "limit": "1000", "filter_keys": "class_name",
                                    "filter_predicates": "=", "filter_values": class_name})
    return cluster.get_json(f"/api/v0/actors?{query}")["data"]["result"]["result"]


def upload_folder(client, folder: Path, bucket: str, prefix: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder).as_posix()}",
                              Body=path.read_bytes())


def final_line(logs: str) -> str:
    """The driver's last line. Ray forwards what tasks and actors print into the same log,
    prefixed "(ActorName pid=…)", and such lines may land after the driver's own last one."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", logs)  # forwarded worker lines may start with a colour code
    return [line for line in plain.split("\n") if line.strip() and not line.startswith("(")][-1]


def test_prepare_finetune_caption_on_a_two_node_cluster(cluster, s3_env, make_bucket, tiny_model):
    with pytest.raises(urllib.error.HTTPError):  # token auth is on: no token, no jobs API
        urllib.request.urlopen(f"{cluster.dashboard_url}/api/jobs/", timeout=10)
    client = s3_env.client()
    bucket = make_bucket("e2e")
    upload_folder(client, tiny_model, bucket, "base")
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # 1. prepare: 180 held-out digits in 2 shards (the caption input), the rest for training.
    submit(cluster, "e2e-prepare", "-m", "jobs.prepare", "digits", "--output", f"s3://{bucket}/digits",
           "--image-size", "32", "--shard-rows", "100", "--test-fraction", "0.1")
    prepare_logs = wait_succeeded(cluster, "e2e-prepare", timeout_s=120)
    timings["prepare"] = time.monotonic() - t0

    # 2. fine-tune: 2 workers x 2 CPUs on nodes of 3 CPUs: necessarily one worker per node.
    t1 = time.monotonic()
    submit(cluster, "e2e-finetune", "-m", "jobs.finetune", "jobs/examples/finetune_digits.yaml",
           "--set", f"data=s3://{bucket}/digits/train", "--set", f"eval_data=s3://{bucket}/digits/test",
           "--set", f"output=s3://{bucket}/runs", "--set", "name=e2e", "--set", f"base_model=s3://{bucket}/base",
           "--set", "workers=2", "--set", "cpus_per_worker=2", "--set", "batch_size=8", "--set", "max_steps=4",
           "--set", "warmup_steps=0", "--set", "checkpoint_every=2", "--set", "log_every=1",
           "--set", "eval_max_batches=1", "--set", "max_failures=0")
    finetune_logs = wait_succeeded(cluster, "e2e-finetune", timeout_s=300)
    timings["finetune"] = time.monotonic() - t1

    # 3. caption with 2 CPU predictor actors, model read from S3 (cached once per node).
    t2 = time.monotonic()
    submit(cluster, "e2e-caption", "-m", "jobs.caption", "jobs/examples/caption_s3.yaml",
           "--set", f"input=s3://{bucket}/digits/test", "--set", f"output=s3://{bucket}/captions",
           "--set", f"model=s3://{bucket}/runs/e2e/model", "--set", "id_columns=[id, label]",
           "--set", "prompt=Describe the image.", "--set", "concurrency=2", "--set", "gpus_per_actor=0",
           "--set", "cpus_per_actor=1", "--set", "dtype=float32", "--set", "batch_size=16",
           "--set", "generation.max_new_tokens=6", "--progress-every", "1")
    caption_logs = wait_succeeded(cluster, "e2e-caption", timeout_s=240)
    timings["caption"] = time.monotonic() - t2
    timings["total"] = time.monotonic() - t0

    endings = {name: final_line(logs) for name, logs in
               [("prepare", prepare_logs), ("finetune", finetune_logs), ("caption", caption_logs)]}
    print(f"\ntwo-node e2e timings (s): {({k: round(v, 1) for k, v in timings.items()})}")
    for name, logs in [("prepare", prepare_logs), ("finetune", finetune_logs), ("caption", caption_logs)]:
        print(f"--- {name} job log, last lines:\n" + "\n".join(logs.rstrip().split("\n")[-8:]))

    # No credential ever shows in what the jobs print: neither S3's nor the cluster's.
    for logs in (prepare_logs, finetune_logs, caption_logs):
        assert s3_env.secret_key not in logs and cluster.token not in logs

    # prepare
    assert f"s3://{bucket}/digits" in endings["prepare"]
    test_rows = sum(pq.ParquetFile(_open(client, bucket, key)).metadata.num_rows
                    for key in _keys(client, bucket, "digits/test/") if key.endswith(".parquet"))
    assert test_rows == 180

    # fine-tune: two workers on two different nodes; progress lines; checkpoints + model on S3.
    workers = actors_of_class(cluster, "RayTrainWorker")
    assert len(workers) == 2, workers
    assert len({w["node_id"] for w in workers}) == 2, "the two training workers shared a node"
    steps = [line for line in finetune_logs.splitlines() if " loss " in line and "tok/s" in line]
    assert any("step 4/4" in line for line in steps), finetune_logs[-4000:]
    assert f"outputs in s3://{bucket}/runs/e2e" in endings["finetune"]
    run_keys = _keys(client, bucket, "runs/e2e/")
    checkpoints = sorted({k.split("/")[2] for k in run_keys if k.count("/") >= 3 and k.split("/")[2].startswith("checkpoint_")})
    assert len(checkpoints) == 2, run_keys  # steps 2 and 4; keep_checkpoints is 2
    for name in checkpoints:
        assert {f"runs/e2e/{name}/model.safetensors", f"runs/e2e/{name}/training_state.pt"} <= set(run_keys)
    assert {"runs/e2e/model/config.json", "runs/e2e/model/model.safetensors", "runs/e2e/training_summary.json",
            "runs/e2e/loss_curve.png"} <= set(run_keys)
    summary = json.loads(_open(client, bucket, "runs/e2e/training_summary.json").read())
    assert summary["steps"] == 4 and summary["workers"] == 2

    # caption: every held-out row once, with a caption; both actors worked; progress lines.
    caption_keys = _keys(client, bucket, "captions/")
    outputs = [k for k in caption_keys if k.endswith(".parquet") and "/_stats/" not in k]
    assert len(outputs) == 2, caption_keys
    rows = [row for key in outputs for row in pq.read_table(_open(client, bucket, key)).to_pylist()]
    assert len(rows) == 180 and len({r["id"] for r in rows}) == 180
    assert all(r["error"] is None and isinstance(r["caption"], str) for r in rows)
    result = json.loads(_open(client, bucket, "captions/_SUMMARY.json").read())
    assert result["rows_out"] == 180 and len(result["rows_per_actor"]) == 2, result["rows_per_actor"]
    progress = [line for line in caption_logs.splitlines() if "caption progress:" in line]
    assert len(progress) >= 3 and "rows/s" in progress[-1], caption_logs[-4000:]
    assert "2/2 shards done" in progress[-1]
    # Ray Data's per-stage progress reaches `ray job logs` beside the job's own lines.
    stages = [line for line in caption_logs.splitlines() if "MapBatches(CaptionPredictor):" in line]
    assert stages and any("MapBatches(read_shards):" in line for line in caption_logs.splitlines()), caption_logs[-4000:]
    assert endings["caption"] == f"caption: done; outputs in s3://{bucket}/captions"


def _keys(client, bucket: str, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def _open(client, bucket: str, key: str) -> io.BytesIO:
    return io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())
