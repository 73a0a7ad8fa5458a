"""Fine-tuning on Ray Train, end to end with real parts (local Ray, SeaweedFS S3)."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from jobs.specs import CaptionSpec, FinetuneSpec, SpecError, build_spec
from pipelines.finetune import format_finetune_summary, run_finetune
from train_hooks import KillOnce, RecordRows, rows_per_epoch
from pipelines.prepare.digits import parse_digit, prepare_digits

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(str(out), image_size=32, seed=0)
    return out


def spec_for(tmp_path: Path, digits: Path, base: Path, **overrides) -> FinetuneSpec:
    data = dict(data=str(digits / "train"), output=str(tmp_path / "runs"), name="run", base_model=str(base),
                stage="full", workers=1, cpus_per_worker=0.5, batch_size=8, lr=3e-3, max_steps=4,
                checkpoint_every=2, log_every=1, eval_max_batches=2)
    data.update(overrides)
    return build_spec(FinetuneSpec, data)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_a_tiny_trol_learns_digits_on_two_ddp_workers(tmp_path, digits, tiny_model, ray_session):
    from pipelines.caption import execute_caption, plan_caption

    started = time.perf_counter()
    # 400 steps reach 92.8% here (300: 86%, 600: 95.8%), in 20 s less than 600 would.
    spec = spec_for(tmp_path, digits, tiny_model, eval_data=str(digits / "test"), workers=2, batch_size=16,
                    lr=2e-3, warmup_steps=20, max_steps=400, checkpoint_every=400, log_every=20, name="digits")
    summary = run_finetune(spec)
    train_seconds = time.perf_counter() - started
    print(format_finetune_summary(summary))
    model_dir = Path(summary["model"])
    assert summary["steps"] == 400 and (tmp_path / "runs" / "digits" / "loss_curve.png").stat().st_size > 5000
    history = summary["history"]
    assert history[-1]["loss"] < history[0]["loss"] / 5
    assert summary["final_metrics"]["eval_loss"] < 0.5

    caption = build_spec(CaptionSpec, dict(
        input=str(digits / "test"), output=str(tmp_path / "captions"), model=str(model_dir),
        id_columns=["id", "label"], prompt="Describe the image.", batch_size=64, actors=1,
        generation={"max_new_tokens": 8}))
    result = execute_caption(plan_caption(caption))
    table = pq.read_table(glob.glob(str(tmp_path / "captions" / "**" / "*.parquet"), recursive=True))
    rows = table.to_pylist()
    assert len(rows) == 360 and result["rows_out"] == 360
    correct = sum(parse_digit(r["caption"] or "") == r["label"] for r in rows)
    accuracy = correct / len(rows)
    print(f"digits accuracy {accuracy:.3f} ({correct}/{len(rows)}), training {train_seconds:.0f}s, "
          f"{summary['mean_tokens_per_s']:.0f} tokens/s")
    assert accuracy >= 0.9


@pytest.fixture(scope="module")
def mixed(digits, tmp_path_factory) -> Path:
    """64 digits rows in one row group, every odd row without its image. With two workers and
    no local shuffle, worker 0 gets every image row and worker 1 only text rows."""
    table = pq.read_table(str(digits / "test")).slice(0, 64)
    images = [cell if i % 2 == 0 else None for i, cell in enumerate(table.column("image").to_pylist())]
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    out = tmp_path_factory.mktemp("mixed")
    pq.write_table(table, out / "part-000.parquet", row_group_size=64)
    return out


@pytest.fixture(scope="module")
def mixed_run(mixed, tiny_model, tmp_path_factory, ray_session):
    """mixed_run(stage) → (folder, summary): one Ray Train run per stage on `mixed` (two
    workers, one of them given only text rows), made once and shared by the tests that check
    different things about it (each run costs ~20 s of Ray Train start-up here)."""
    from pipelines.prepare.benchmarks import prepare_digits_choice

    runs: dict[str, tuple[Path, dict]] = {}

    def run(stage: str) -> tuple[Path, dict]:
        if stage not in runs:
            out = tmp_path_factory.mktemp(f"stage-{stage}")
            extra = {}
            if stage == "1":  # the evaluate: section scores the base and the trained model
                prepare_digits_choice(str(out / "choice"), image_size=32)
                benchmark = {"name": "digits", "data": str(out / "choice"), "kind": "multiple_choice", "limit": 4}
                extra["evaluate"] = {"benchmarks": [benchmark], "max_new_tokens": 2, "batch_size": 4}
            summary = run_finetune(spec_for(
                out, mixed, tiny_model, data=str(mixed), stage=stage, workers=2, batch_size=2, grad_accum=2,
                shuffle_window=1, max_steps=4, checkpoint_every=2, lr=1e-2,
                lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, **extra),
                hooks=[RecordRows(str(out / "rows.jsonl"))])
            runs[stage] = (out, summary)
        return runs[stage]

    return run


@pytest.mark.slow
def test_stage1_trains_only_projector_and_mixers_then_evaluates(mixed_run, tiny_model):
    out, summary = mixed_run("1")
    before, after = weights(tiny_model), weights(Path(summary["model"]))
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    trainable = {k for k in before if k.startswith("vision.projector.") or ".mixer." in k}
    assert changed == trainable
    assert summary["steps"] == 4 and len(summary["history"]) == 4
    # 4 steps x 8 rows (2 workers x 2 micro-batches of 2), half of them text-only: every row
    # is counted once, at over 15 tokens a row on average (losing a rank's or a micro-batch's
    # count would halve it).
    assert summary["tokens_seen"] > 4 * 8 * 15 and summary["mean_tokens_per_s"] > 0

    # The evaluate: section: base and trained model scored, both in training_summary.json.
    run_dir = out / "runs" / "run"
    evaluation = summary["evaluation"]
    assert json.loads((run_dir / "training_summary.json").read_text())["evaluation"] == evaluation
    assert (evaluation["base"]["model"], evaluation["trained"]["model"]) == (str(tiny_model), summary["model"])
    for label in ("base", "trained"):
        overall = evaluation[label]["benchmarks"]["digits"]["overall"]
        predictions = pq.read_table(run_dir / "evaluation" / label / "predictions.parquet").to_pylist()
        assert overall["count"] == len(predictions) == 4 and overall["correct"] == sum(p["correct"] for p in predictions)
    assert "| base | trained | Δ |" in evaluation["comparison"] and "| digits | all | accuracy |" in evaluation["comparison"]


@pytest.mark.slow
def test_stage2_trains_lora_projector_and_mixers_then_merges(mixed_run, tiny_model):
    _, summary = mixed_run("2")
    before, after = weights(tiny_model), weights(Path(summary["model"]))
    assert before.keys() == after.keys(), "LoRA is merged: the export is a plain TroL checkpoint"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    lora_targets = {k for k in before if k.endswith(("q_proj.weight", "v_proj.weight")) and "language_model" in k}
    trainable = {k for k in before if k.startswith("vision.projector.") or ".mixer." in k}
    assert changed == trainable | lora_targets


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["1", "2", "full"])
def test_text_only_ranks_step_with_image_ranks_under_ddp(mixed_run, stage):
    out, summary = mixed_run(stage)
    assert summary["steps"] == 4 and all(h["loss"] > 0 for h in summary["history"])
    records = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    by_rank = {r: {row % 2 for rec in records if rec["rank"] == r for row in rec["rows"]} for r in (0, 1)}
    assert by_rank == {0: {0}, 1: {1}}, "one worker saw only image rows, the other only text rows"


def test_keep_adapter_export_loads_like_the_merged_one(tmp_path):
    from trol import load_model
    from trol.tiny import build_tiny
    from trol.training import LoraSettings, prepare_for_stage
    from pipelines.finetune.checkpoint import export_model

    outputs = []
    for keep in (False, True):
        model, processor = build_tiny("phi3")
        prepare_for_stage(model, "2", LoraSettings(r=4, alpha=8, dropout=0.0))
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.2)
        export_model(model, processor, str(tmp_path / str(keep)), keep_adapter=keep)
        loaded, proc = load_model(str(tmp_path / str(keep)), dtype="float32", device="cpu")
        batch = proc(text=[proc.build_prompt("hi", with_image=False)])
        with torch.no_grad():
            outputs.append(loaded(**batch).logits)
    assert (tmp_path / "True" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "False" / "adapter").exists()
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_checkpoints_model_and_tracking_on_s3(tmp_path, digits, tiny_model, s3_env, make_bucket, monkeypatch):
    from pipelines.storage import Storage
    from pipelines.storage import parse_uri as storage_location
    from pipelines.models import materialize_model, resolve_model_ref

    bucket = make_bucket("ft")
    client = s3_env.client()
    for folder, prefix in [(tiny_model, "models/tiny"), (digits / "train", "data/train")]:
        for path in folder.rglob("*"):
            if path.is_file():
                client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(folder)}", Body=path.read_bytes())
    summary = run_finetune(spec_for(
        tmp_path, digits, tiny_model, data=f"s3://{bucket}/data/train", base_model=f"s3://{bucket}/models/tiny",
        output=f"s3://{bucket}/runs", storage={"endpoint_url": s3_env.endpoint_url}, keep_checkpoints=1,
        model_cache_dir=str(tmp_path / "cache"), tracking={"mlflow": True, "tensorboard": True}))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="runs/run/")["Contents"]]
    checkpoints = {k.split("/")[2] for k in keys if k.count("/") > 2 and k.split("/")[2].startswith("checkpoint_")}
    assert len(checkpoints) == 1, "keep_checkpoints=1 keeps only the newest"
    assert any(k.endswith("training_state.pt") for k in keys)
    assert "runs/run/model/model.safetensors" in keys and "runs/run/loss_curve.png" in keys
    assert summary["model"] == f"s3://{bucket}/runs/run/model"
    storage = Storage.from_environment(s3_env.endpoint_url)
    local = materialize_model(resolve_model_ref(summary["model"], storage), storage, str(tmp_path / "cache2"))
    from trol import TroLForConditionalGeneration

    assert TroLForConditionalGeneration.from_pretrained(local).config.model_type == "trol"

    # Tracking on s3: written locally by rank 0, uploaded beside the checkpoints.
    assert any(k.startswith("runs/run/tensorboard/events.out.tfevents.") for k in keys)
    storage.download_folder(storage_location(f"s3://{bucket}/runs/run/mlruns"), str(tmp_path / "mlruns"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_env.endpoint_url)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file://{tmp_path / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("trol-ray").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert run.info.artifact_uri.startswith(f"s3://{bucket}/runs/run/mlflow-artifacts/")
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"loss_curve.png", "training_summary.json"}


@pytest.fixture(scope="module")
def crashed_epoch_run(digits, tiny_model, tmp_path_factory, ray_session) -> tuple[dict, dict]:
    """An epoch run whose worker dies at step 5 with max_failures=0 (the run fails), run
    again (it resumes), then once more (it is finished): the summaries of the last two."""
    out = tmp_path_factory.mktemp("crashed")
    spec = spec_for(out, digits, tiny_model, data=str(digits / "test"), max_steps=None, epochs=1,
                    batch_size=16, checkpoint_every=3, log_every=5, max_failures=0)
    with pytest.raises(Exception):
        run_finetune(spec, hooks=[KillOnce(5, str(out / "killed"))])
    summary = run_finetune(spec)
    return summary, run_finetune(spec)


@pytest.mark.slow
def test_rerun_after_a_crash_resumes(crashed_epoch_run):
    summary, again = crashed_epoch_run
    assert summary["resumed_from"] == [3] and summary["steps"] == 360 // 16 + 1
    # a finished run stays finished
    assert again["steps"] == summary["steps"] and again["resumed_from"] == [3, summary["steps"]]


@pytest.mark.parametrize("change, field", [
    ({"stage": "3"}, "stage"),
    ({"max_steps": None}, "(spec)"),
    ({"quantize": 4}, "(spec)"),
    ({"lora": {"rank": 4}}, "lora.rank"),
    ({"learning_rate": 1}, "learning_rate"),
    ({"data": "/nonexistent/shards"}, "data"),
    ({"image_column": "pixels"}, "image_column"),
    ({"base_model": "/nonexistent/model"}, "base_model"),
])
def test_spec_errors_name_the_field_before_any_model_loads(tmp_path, digits, tiny_model, change, field):
    with pytest.raises(SpecError) as err:
        run_finetune(spec_for(tmp_path, digits, tiny_model, **change))
    assert err.value.field == field, str(err.value)
    assert not (tmp_path / "runs" / "run" / "model").exists()


@pytest.mark.slow
def test_epoch_runs_stop_after_their_epochs_even_when_rerun(crashed_epoch_run):
    summary, again = crashed_epoch_run
    assert summary["epochs"] == 1 and summary["steps"] == 360 // 16 + 1
    assert summary["data"]["rows_used"] == 360, "the rows of the crashed attempt's lost steps count once"
    assert again["steps"] == summary["steps"] and again["resumed_from"][-1] == summary["steps"]
    assert again["data"]["rows_used"] == 360, "a finished run trains no extra epoch"


def mid_epoch_spec(out: Path, digits: Path, tiny_model: Path, name: str, **overrides) -> FinetuneSpec:
    """The killed and plain runs' spec; the FSDP test runs it too and compares to plain."""
    return spec_for(out, digits, tiny_model, data=str(digits / "test"), name=name, workers=2, batch_size=8,
                    grad_accum=2, shuffle_window=64, max_steps=16, checkpoint_every=5, max_failures=1, **overrides)


@pytest.fixture(scope="module")
def killed_mid_epoch(digits, tiny_model, tmp_path_factory, ray_session):
    """Two runs of 16 steps on 2 workers, recording their rows: one whose rank-1 worker dies
    after step 7 (max_failures=1: Ray Train restarts it within the run), one left alone.
    360 rows, 2 workers x 2 micro-batches of 8: 12 steps per epoch, so 16 steps cross into
    epoch 1, and the restart from the checkpoint at step 5 is mid-epoch."""
    out = tmp_path_factory.mktemp("killed-mid-epoch")

    def run(name: str, hooks: list) -> tuple[dict, dict[int, list[int]]]:
        record = out / f"{name}.jsonl"
        spec = mid_epoch_spec(out, digits, tiny_model, name)
        summary = run_finetune(spec, hooks=[RecordRows(str(record)), *hooks])
        return summary, rows_per_epoch(str(record))

    return run("killed", [KillOnce(7, str(out / "killed-marker"))]), run("plain", [])


@pytest.mark.slow
def test_a_killed_worker_restarts_from_the_last_checkpoint(killed_mid_epoch):
    (killed, _), _ = killed_mid_epoch
    assert killed["resumed_from"] == [5]
    assert killed["steps"] == 16
    # The loss curve continues from the checkpoint: steps 6-7 of the killed attempt are redone.
    assert [h["step"] for h in killed["history"]] == list(range(1, 17))


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_on_exactly_the_rows_it_had_left(killed_mid_epoch):
    (killed, resumed_rows), (plain, plain_rows) = killed_mid_epoch
    assert killed["resumed_from"] == [5] and killed["steps"] == plain["steps"] == 16
    assert resumed_rows == plain_rows, "the same rows per epoch, each as often"
    assert resumed_rows[0] == list(range(360)), "epoch 0: every row exactly once"
    assert len(resumed_rows[1]) == 4 * 2 * 2 * 8
    assert killed["data"]["rows_used"] == plain["data"]["rows_used"] == 360 + 128, "skipped rows are not counted"
    steps = [h["step"] for h in killed["history"]]
    assert steps == list(range(1, 17))


@pytest.mark.slow
def test_fsdp2_on_two_cpu_workers_matches_ddp_and_resumes_from_s3_shards(tmp_path, digits, tiny_model, s3_env,
                                                                         make_bucket, killed_mid_epoch):
    """The mid-epoch spec under FSDP2, its rank-1 worker killed after step 7, checkpoints on
    S3: the same losses as the uninterrupted DDP run of that spec (`killed_mid_epoch`'s plain
    run, shared rather than run again)."""
    _, (ddp, _) = killed_mid_epoch
    bucket = make_bucket("fsdp")
    fsdp = run_finetune(mid_epoch_spec(tmp_path, digits, tiny_model, "fsdp", strategy="fsdp",
                                       output=f"s3://{bucket}/runs", storage={"endpoint_url": s3_env.endpoint_url}),
                        hooks=[KillOnce(7, str(tmp_path / "fsdp-killed"))])
    assert fsdp["resumed_from"] == [5], "restarted from the sharded checkpoint on S3"
    ddp_losses = [h["loss"] for h in ddp["history"]]
    fsdp_losses = [h["loss"] for h in fsdp["history"]]
    assert len(fsdp_losses) == len(ddp_losses) == 16
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4, abs=1e-4)
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket, Prefix="runs/fsdp/")["Contents"]]
    shards = [k for k in keys if k.endswith(".distcp")]
    assert {k.rsplit("/", 1)[-1] for k in shards} >= {"__0_0.distcp", "__1_0.distcp"}, "each rank wrote its shards"
    assert f"runs/fsdp/model/model.safetensors" in keys, "one consolidated export"
