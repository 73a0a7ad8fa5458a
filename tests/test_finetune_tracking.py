"""One short fine-tuning run on the session's Ray carries three claims:

- the workers' placement-group bundles hold their data tasks' CPUs too: once the group is
  placed, another job may take every CPU left and training still finishes;
- a run that cannot start says why after `stall_after_s` (the pending placement group and
  each stage), and says when it moves again;
- rank 0 alone tracks the run: MLflow (read back with MLflow's own client) and TensorBoard
  (read back with TensorBoard's event reader) hold the per-step metrics, eval loss, params
  and the artifacts. The s3:// case rides on test_finetune's S3 run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import ray

from jobs.specs import FinetuneSpec, build_spec
from pipelines.finetune import run_finetune, worker_resources
from pipelines.prepare.digits import prepare_digits

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


@ray.remote(num_cpus=0)
class CpuHolder:
    """Stands for another job's actors: holds CPUs until killed."""

    def ready(self) -> bool:
        return True


def hold_cpus(cpus: float):
    holder = CpuHolder.options(num_cpus=cpus).remote()
    ray.get(holder.ready.remote(), timeout=60)
    return holder


def placed_groups(bundle: dict[str, float]) -> list[dict]:
    return [pg for pg in ray.util.placement_group_table().values()
            if pg["state"] == "CREATED" and list(pg["bundles"].values()) == [bundle] * len(pg["bundles"])]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_reserved_data_cpus_stall_report_and_rank0_tracking(tmp_path: Path, tiny_model: Path, caplog):
    digits = tmp_path / "digits"
    prepare_digits(str(digits), image_size=32, seed=0, shard_rows=256)
    spec = build_spec(FinetuneSpec, dict(
        data=str(digits / "train"), eval_data=str(digits / "test"), output=str(tmp_path / "runs"), name="tracked",
        base_model=str(tiny_model), stage="full", workers=2, cpus_per_worker=0.5, data_cpus_per_task=0.5,
        batch_size=8, lr=3e-3, max_steps=3, checkpoint_every=2, log_every=1, eval_max_batches=1,
        tracking={"mlflow": True, "tensorboard": True}))
    bundle = worker_resources(spec)
    assert bundle == {"CPU": 1.0}, "a worker's bundle holds its own CPU and its data tasks'"

    caplog.set_level(logging.WARNING, logger="pipelines.stall")
    blocker = hold_cpus(ray.cluster_resources()["CPU"])  # another job holds every CPU
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(summary=run_finetune(spec, stall_after_s=1.0)), daemon=True)
    thread.start()
    # Reported every second while it lasts; Ray Train asks for the group once its controller runs.
    stalled = wait_for(lambda: [r.getMessage() for r in caplog.records if "placement group" in r.getMessage()], 120,
                       "a stall report naming the pending placement group")[0]
    assert stalled.startswith("finetune tracked: no progress for"), stalled
    assert "pending: PACK {CPU: 1} x2" in stalled, stalled
    assert "workers: not started" in stalled and "(CPU 0/2 free)" in stalled, stalled

    ray.kill(blocker)
    wait_for(lambda: placed_groups(bundle), 120, "the workers' placement group")
    # Whatever is free now, another job takes; the data tasks must not need any of it.
    free = ray.available_resources().get("CPU", 0.0)
    thief = hold_cpus(free) if free >= 0.01 else None
    thread.join(timeout=600)
    if thief is not None:
        ray.kill(thief)
    assert not thread.is_alive(), "training starved: its data tasks waited for CPUs another job took"
    summary = outcome["summary"]
    assert summary["steps"] == 3
    assert any("progressing again" in r.getMessage() for r in caplog.records)

    run_dir = tmp_path / "runs" / "tracked"
    # --- MLflow, through its own client, from the file store in the run folder
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{run_dir / 'mlruns'}")
    experiment = client.get_experiment_by_name("trol-ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "rank 0 alone logs"
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.params["lr"] == "0.003" and run.data.params["lora.r"] == "16"
    assert run.data.params["world_size"] == "2"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3]
    assert [round(m.value, 6) for m in losses] == [round(h["loss"], 6) for h in summary["history"]]
    for key in ("lr", "tokens_per_s", "data_wait", "mfu", "step_time_s"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval_loss")] == [2, 3]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss_curve.png", "training_summary.json"}

    # --- TensorBoard, through its event reader, next to the checkpoints
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(event_files) == 1, "rank 0 alone writes events"
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 3]
    assert {"train/tokens_per_s", "train/data_wait", "train/mfu", "train/lr"} <= set(events.Tags()["scalars"])
