"""Tracked training runs: MLflow and TensorBoard, written by rank 0 only.

- MLflow: the spec as params (dotted keys, e.g. `lora.r`), per logging step `loss`, `lr`,
  `tokens_per_s`, `data_wait`, `mfu`, `step_time_s`, and `eval_loss` at each checkpoint;
  at the end `loss_curve.png` and `training_summary.json` as artifacts. The default store
  is a file store in output/name/mlruns (MLflow keeps that backend in maintenance mode:
  reading it needs MLFLOW_ALLOW_FILE_STORE=true); `tracking_uri` sends the run to a server.
- TensorBoard: event files in output/name/tensorboard/, next to the checkpoints; the same
  metrics under `train/…` and `eval/loss`.

On s3:// outputs both stores are written in a local folder and uploaded to the same places
under output/name/ at each checkpoint and at the end; MLflow's artifacts go straight to
output/name/mlflow-artifacts/ (the uploaded store points there). A resumed run continues
its MLflow run (found by the `trol_ray.run_dir` tag) and adds a TensorBoard event file.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from typing import Any

from ..specs import FinetuneSpec, SpecError, TrackingSpec
from ..storage import Location, Storage

TRAIN_METRICS = ("loss", "lr", "tokens_per_s", "data_wait", "mfu", "step_time_s")
RUN_DIR_TAG = "trol_ray.run_dir"
MLFLOW_SUBDIR, MLFLOW_ARTIFACTS_SUBDIR, TENSORBOARD_SUBDIR = "mlruns", "mlflow-artifacts", "tensorboard"


def check_tracking_installed(tracking: TrackingSpec) -> None:
    """A tracker the spec asks for must be importable, or the spec is refused before training."""
    needs = [("tracking.mlflow", "mlflow", tracking.mlflow is not None),
             ("tracking.tensorboard", "tensorboard", tracking.tensorboard)]
    for field, module, wanted in needs:
        if wanted and importlib.util.find_spec(module) is None:
            raise SpecError(field, f"needs the {module!r} package, which is not installed; install the tracking "
                            "extra (pip install 'trol-ray[tracking]') or turn this tracker off")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"lora": {"r": 16}} -> {"lora.r": "16"}: MLflow params are flat strings."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return out


class Tracker:
    """Rank 0's trackers for one run. Every method is a no-op for a tracker that is off."""

    def __init__(self, spec: FinetuneSpec, run_dir: Location, storage: Storage, extra_params: dict[str, Any]):
        self.run_dir, self.storage = run_dir, storage
        self.remote = run_dir.scheme == "s3"
        # Written in place for local outputs; in a scratch folder, then uploaded, for s3.
        self._scratch = tempfile.TemporaryDirectory(prefix="trol-tracking-") if self.remote else None
        self._uploaded: dict[str, tuple[int, int]] = {}
        self.mlflow = _MlflowRun(spec, self._local(MLFLOW_SUBDIR), run_dir, storage, extra_params) \
            if spec.tracking.mlflow is not None else None
        self.tensorboard = None
        if spec.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=self._local(TENSORBOARD_SUBDIR))

    def _local(self, sub: str) -> str:
        base = self._scratch.name if self._scratch else self.run_dir.path
        return os.path.join(base, sub)

    def log(self, entry: dict[str, Any]) -> None:
        """One logging step's metrics (metrics.StepMeter.flush's entry)."""
        step = int(entry["step"])
        values = {k: float(entry[k]) for k in TRAIN_METRICS if entry.get(k) is not None}
        if self.mlflow:
            self.mlflow.log(values, step)
        if self.tensorboard:
            for key, value in values.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def log_eval(self, eval_loss: float, step: int) -> None:
        if self.mlflow:
            self.mlflow.log({"eval_loss": eval_loss}, step)
        if self.tensorboard:
            self.tensorboard.add_scalar("eval/loss", eval_loss, step)

    def flush(self) -> None:
        """At each checkpoint: on disk, and on s3 for s3 outputs."""
        if self.tensorboard:
            self.tensorboard.flush()
        if self.remote:
            self._upload()

    def finish(self, summary: dict[str, Any], loss_curve_png: bytes | None) -> None:
        if self.mlflow:
            self.mlflow.finish(summary, loss_curve_png)
        if self.tensorboard:
            self.tensorboard.close()
        if self.remote:
            self._upload()
            self._scratch.cleanup()

    def fail(self) -> None:
        """The loop raised: mark the MLflow run failed (a resume sets it running again)."""
        if self.mlflow:
            self.mlflow.end("FAILED")
        if self.remote:
            self._upload()

    def _upload(self) -> None:
        for root, dirs, files in os.walk(self._scratch.name):
            if not dirs and not files:  # MLflow's file store needs a run's (empty) artifacts/
                keep = os.path.join(root, ".keep")  # folder; object stores keep no empty folders
                open(keep, "wb").close()
                files = [".keep"]
            for name in files:
                path = os.path.join(root, name)
                stat = os.stat(path)
                rel = os.path.relpath(path, self._scratch.name).replace(os.sep, "/")
                if self._uploaded.get(rel) != (stat.st_size, stat.st_mtime_ns):
                    with open(path, "rb") as f:
                        self.storage.write_bytes(self.run_dir.join(rel), f.read())
                    self._uploaded[rel] = (stat.st_size, stat.st_mtime_ns)


def _share_s3_settings(storage: Storage) -> None:
    """MLflow uploads artifacts with its own boto3 client, configured by the environment:
    give it the endpoint, region and credentials this job resolved (without overriding any
    the process already has)."""
    settings = {"MLFLOW_S3_ENDPOINT_URL": storage.endpoint_url, "AWS_DEFAULT_REGION": storage.region}
    if storage.credentials is not None:
        settings.update(AWS_ACCESS_KEY_ID=storage.credentials.access_key,
                        AWS_SECRET_ACCESS_KEY=storage.credentials.secret_key,
                        AWS_SESSION_TOKEN=storage.credentials.token)
    for key, value in settings.items():
        if value and not os.environ.get(key):
            os.environ[key] = value
    # Train workers log INFO to the console; botocore would announce where it found them.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)


class _MlflowRun:
    def __init__(self, spec: FinetuneSpec, local_store: str, run_dir: Location, storage: Storage,
                 extra_params: dict[str, Any]):
        settings = spec.tracking.mlflow
        uri, artifacts = settings.tracking_uri, None
        if uri is None:
            if run_dir.scheme == "s3":  # continue the store a previous attempt uploaded
                remote_store = run_dir.join(MLFLOW_SUBDIR)
                if storage.list_files(remote_store):
                    storage.download_folder(remote_store, local_store)
                artifacts = run_dir.join(MLFLOW_ARTIFACTS_SUBDIR).uri
                _share_s3_settings(storage)
            os.makedirs(local_store, exist_ok=True)
            uri = "file://" + os.path.abspath(local_store)
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 refuses its file store unless asked for it explicitly; it is ours by default.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._metric, self._param = Metric, Param
        self.client = MlflowClient(tracking_uri=uri)
        self.uri = uri
        experiment = self.client.get_experiment_by_name(settings.experiment)
        experiment_id = experiment.experiment_id if experiment else \
            self.client.create_experiment(settings.experiment, artifact_location=artifacts)
        params = flatten({**spec.model_dump(mode="json"), **extra_params})
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir.uri}'",
                                        max_results=1)
        if found:  # a resumed run: params stay as first logged; changed ones are tagged
            run = found[0]
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            old = run.data.params
            new = {k: v for k, v in params.items() if k not in old}
            for key, value in params.items():
                if key in old and old[key] != value:
                    self.client.set_tag(self.run_id, f"trol_ray.resumed.{key}", value[:5000])
        else:
            run = self.client.create_run(experiment_id, run_name=spec.name, tags={RUN_DIR_TAG: run_dir.uri})
            self.run_id, new = run.info.run_id, params
        items = [Param(k, v[:6000]) for k, v in sorted(new.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self._metric(k, v, now, step) for k, v in values.items()])

    def finish(self, summary: dict[str, Any], loss_curve_png: bytes | None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            with open(os.path.join(folder, "training_summary.json"), "w") as f:
                json.dump(summary, f, indent=1, default=str)
            if loss_curve_png:
                with open(os.path.join(folder, "loss_curve.png"), "wb") as f:
                    f.write(loss_curve_png)
            self.client.log_artifacts(self.run_id, folder)
        self.end("FINISHED")

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)
