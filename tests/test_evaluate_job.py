"""The evaluate job end to end on the shared local Ray with a tiny TroL: benchmarks and
outputs on SeaweedFS, a corrupt row, the metrics recounted from the predictions file,
comparing runs, and fine-tuning that checks its benchmarks first."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.evaluate import main as evaluate
from jobs.specs import FinetuneSpec, SpecError, build_spec
from pipelines.evaluate.metrics import benchmark_metrics
from pipelines.finetune import run_finetune
from pipelines.prepare.digits import prepare_digits
from pipelines.prepare.benchmarks import EVAL_SCHEMA, prepare_digits_choice
from pipelines.storage import Storage, parse_uri

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def square(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(buf, format="PNG")
    return buf.getvalue()


def yes_no_rows() -> list[dict]:
    """Two images, each asked a yes and a no question (MME's pairs), and a corrupt image."""
    rows = []
    for colour, other in (("red", "blue"), ("blue", "red")):
        for asked, answer in ((colour, "yes"), (other, "no")):
            rows.append({"id": f"{colour}-{asked}", "image": square(colour), "image_id": colour,
                         "question": f"Is the square {asked}?", "hint": None, "choices": None, "answer": answer,
                         "category": "colour"})
    rows.append({"id": "corrupt", "image": b"\x89PNG\r\n\x1a\n not really", "image_id": "corrupt",
                 "question": "Is the square red?", "hint": None, "choices": None, "answer": "yes", "category": "colour"})
    return rows


def recount(predictions: list[dict], kind: str, **options) -> dict:
    return benchmark_metrics(predictions, kind=kind, **options)


def test_benchmarks_on_s3_corrupt_row_recount_and_compare(tiny_model: Path, s3_env, make_bucket, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    bucket = make_bucket("eval")
    client = s3_env.client()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)  # how `prepare` finds the server
    prepare_digits_choice(f"s3://{bucket}/bench/digits", image_size=16, shard_rows=4)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(yes_no_rows(), schema=EVAL_SCHEMA), buf)
    client.put_object(Bucket=bucket, Key="bench/colours/part-00000.parquet", Body=buf.getvalue())
    spec = {"model": str(tiny_model), "output": f"s3://{bucket}/eval/run", "max_new_tokens": 3, "batch_size": 4,
            "dtype": "float32", "storage": {"endpoint_url": s3_env.endpoint_url},
            "benchmarks": [
                {"name": "digits", "data": f"s3://{bucket}/bench/digits", "kind": "multiple_choice", "limit": 6},
                {"name": "colours", "data": f"s3://{bucket}/bench/colours/", "kind": "yes_no", "mme_score": True,
                 "image_key_column": "image_id"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert evaluate([str(tmp_path / "spec.yaml")]) == 0
    out = capsys.readouterr().out
    assert "digits (multiple_choice): " in out and f"outputs in s3://{bucket}/eval/run" in out

    storage = Storage.from_environment(s3_env.endpoint_url)
    metrics = storage.read_json(parse_uri(f"s3://{bucket}/eval/run/metrics.json"))
    table = pq.read_table(io.BytesIO(storage.read_bytes(parse_uri(f"s3://{bucket}/eval/run/predictions.parquet"))))
    assert table.column_names == ["id", "benchmark", "category", "rotation", "prompt", "answer", "output", "parsed",
                                  "parsed_by", "correct", "error", "image_key", "num_tokens"]
    predictions = table.to_pylist()
    digits = [p for p in predictions if p["benchmark"] == "digits"]
    colours = [p for p in predictions if p["benchmark"] == "colours"]
    assert len(digits) == 6 and len(colours) == 5 and metrics["status"] == "complete"
    assert digits[0]["prompt"].startswith("Which digit is written in the image?\nA. zero\nB. one")
    # Every figure is a recount of the predictions file.
    assert metrics["benchmarks"]["digits"]["overall"] == recount(digits, "multiple_choice")["overall"]
    recounted = recount(colours, "yes_no", mme_score=True)
    assert metrics["benchmarks"]["colours"]["overall"] == recounted["overall"]
    assert metrics["benchmarks"]["colours"]["mme_total"] == recounted["mme_total"]
    # The corrupt image: a row with an error, counted wrong, reported apart.
    [corrupt] = [p for p in colours if p["id"] == "corrupt"]
    assert corrupt["error"] and corrupt["output"] is None and corrupt["correct"] is False
    assert metrics["benchmarks"]["colours"]["overall"]["errors"] == 1 and metrics["errors"] == 1
    assert all(p["error"] is None and isinstance(p["output"], str) for p in digits + colours if p["id"] != "corrupt")
    assert metrics["benchmarks"]["colours"]["categories"]["colour"]["mme"]["images"] == 3
    md = storage.read_bytes(parse_uri(f"s3://{bucket}/eval/run/metrics.md")).decode()
    assert "| digits | all | 6 |" in md and "| colours | all | 5 |" in md

    # Comparing: the same metrics with one accuracy moved shows the delta in points.
    other = json.loads(json.dumps(metrics))
    other["model"] = "other"
    other["benchmarks"]["digits"]["overall"]["accuracy"] = (metrics["benchmarks"]["digits"]["overall"]["accuracy"] or 0) + 0.5
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert evaluate(["--compare", f"s3://{bucket}/eval/run/metrics.json", str(tmp_path / "other.json")]) == 0
    compared = capsys.readouterr().out
    assert f"| other | {tiny_model} | Δ |" in compared and "-50.0 pt" in compared


def test_bad_specs_exit_2_naming_the_field(tiny_model: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump({
        "model": str(tiny_model), "output": str(tmp_path / "out"),
        "benchmarks": [{"name": "b", "data": str(tmp_path / "absent"), "kind": "yes_no"}]}))
    assert evaluate([str(tmp_path / "spec.yaml")]) == 2
    assert "benchmarks.0.data" in capsys.readouterr().err
    assert evaluate([str(tmp_path / "spec.yaml"), "--set", "benchmarks.0.kind=essay"]) == 2
    assert "benchmarks.0.kind" in capsys.readouterr().err
    assert evaluate([]) == 2


def test_finetune_checks_its_benchmarks_before_training(tmp_path: Path, tiny_model: Path) -> None:
    """The evaluation after training itself is tested with test_finetune's stage-1 run."""
    prepare_digits(str(tmp_path / "digits"), image_size=16, test_fraction=0.5)
    spec = build_spec(FinetuneSpec, dict(
        data=str(tmp_path / "digits" / "train"), output=str(tmp_path / "runs"), name="run", base_model=str(tiny_model),
        max_steps=2, evaluate={"benchmarks": [{"name": "d", "data": str(tmp_path / "absent"), "kind": "yes_no"}]}))
    with pytest.raises(SpecError) as err:
        run_finetune(spec)
    assert err.value.field == "evaluate.benchmarks.0.data" and not (tmp_path / "runs" / "run").exists()
