"""Evaluate job parts without Ray: planning, reading a shard into questions, scoring the
replies and writing the outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.evaluate.benchmark_spec import BenchmarkSpec
from pipelines.evaluate.plan import ROW_COLUMN, SHARD_COLUMN, SHARD_FAILED, plan_benchmarks, read_shard
from pipelines.evaluate.results import evaluation_metrics, score_replies, write_outputs
from pipelines.specs import SpecError
from pipelines.storage import Storage, parse_uri


def write(path: Path, rows: list[dict], row_group_size: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"index": start + i, "image": b"img%d" % (start + i), "question": f"q{start + i}?",
             "A": "cat", "B": "dog", "answer": "AB"[i % 2], "category": "pets"} for i in range(n)]


def test_plan_checks_fields_and_reports_unusable_shards(tmp_path: Path, tiny_model: Path) -> None:
    storage = Storage()
    write(tmp_path / "mc" / "part-0.parquet", rows(5))
    write(tmp_path / "mc" / "part-1.parquet", rows(5, 5))
    (tmp_path / "mc" / "part-2.parquet").write_bytes(b"PAR1 not parquet at all")
    write(tmp_path / "mc" / "part-3.parquet", [{"image": b"x", "question": "q"}])  # no answer column
    bench = BenchmarkSpec(name="mc", data=str(tmp_path / "mc"), kind="multiple_choice")
    plan = plan_benchmarks([bench], str(tiny_model), str(tmp_path / "out"), storage)
    assert [(t.uri.rsplit("/", 1)[1], t.rows) for t in plan.tasks] == [("part-0.parquet", 5), ("part-1.parquet", 5)]
    reasons = {u.rsplit("/", 1)[1]: why for u, why in plan.unusable.items()}
    assert set(reasons) == {"part-2.parquet", "part-3.parquet"} and "no column 'answer'" in reasons["part-3.parquet"]
    bench = BenchmarkSpec(name="mc", data=str(tmp_path / "mc"), kind="multiple_choice", limit=7)
    plan = plan_benchmarks([bench], str(tiny_model), str(tmp_path / "out"), storage)
    assert [(t.uri.rsplit("/", 1)[1], t.rows) for t in plan.tasks] == [("part-0.parquet", 5), ("part-1.parquet", 2)]
    yes_no = BenchmarkSpec(name="yn", data=str(tmp_path / "mc" / "part-3.parquet"), kind="yes_no")
    with pytest.raises(SpecError) as err:
        plan_benchmarks([bench, yes_no], str(tiny_model), str(tmp_path / "out"), storage)
    assert err.value.field == "benchmarks.1.data" and "'answer'" in str(err.value)
    with pytest.raises(SpecError) as err:
        plan_benchmarks([bench], str(tmp_path / "no-model"), str(tmp_path / "out"), storage)
    assert err.value.field == "model"
    missing = BenchmarkSpec(name="m", data=str(tmp_path / "nothing"), kind="yes_no")
    with pytest.raises(SpecError, match="benchmarks.0.data"):
        plan_benchmarks([missing], str(tiny_model), str(tmp_path / "out"), storage, field_prefix="")


def test_read_score_and_write_keep_input_order_and_drop_failed_shards(tmp_path: Path, tiny_model: Path) -> None:
    storage = Storage()
    good = rows(70) + [{"index": 99, "image": b"x", "question": "q?", "A": "cat", "B": None, "answer": "A",
                        "category": "pets"}]
    write(tmp_path / "mc" / "part-0.parquet", good, row_group_size=32)
    write(tmp_path / "mc" / "part-1.parquet", rows(40, 100), row_group_size=16)
    bench = BenchmarkSpec(name="mc", data=str(tmp_path / "mc"), kind="multiple_choice", circular=True)
    plan = plan_benchmarks([bench], str(tiny_model), str(tmp_path / "out"), storage)
    first = pa.concat_tables(list(read_shard(plan.tasks[0], bench, storage)))
    assert first.num_rows == 70 * 2 + 1 and first.column(ROW_COLUMN).to_pylist()[-1] == 70
    bad_row = first.slice(first.num_rows - 1).to_pylist()[0]
    assert bad_row["image"] is None and "at least 2 options" in bad_row["problem"]

    # Corrupt the second shard's data pages after planning: the reader ends with a marker.
    data = bytearray((tmp_path / "mc" / "part-1.parquet").read_bytes())
    data[200:1200] = b"\xff" * 1000
    (tmp_path / "mc" / "part-1.parquet").write_bytes(bytes(data))
    second = pa.concat_tables(list(read_shard(plan.tasks[1], bench, storage)))
    assert second.column(SHARD_FAILED).to_pylist()[-1] is not None

    # Replies as the processor returns them (shuffled): answer "A" everywhere.
    replies = [{**r, "caption": "A", "error": None, "num_tokens": 2}
               for r in pa.concat_tables([second, first]).drop_columns(["image"]).to_pylist()][::-1]
    predictions, failed = score_replies([bench], replies, reply_column="caption", shard_column=SHARD_COLUMN,
                                        row_column=ROW_COLUMN, failed_column=SHARD_FAILED,
                                        expected={t.uri: t.rows for t in plan.tasks})
    assert list(failed) == [plan.tasks[1].uri]
    # A shard whose rows did not all come back is not scored on the rest.
    _, thin = score_replies([bench], [r for r in replies if r[ROW_COLUMN] != 3], reply_column="caption",
                            shard_column=SHARD_COLUMN, row_column=ROW_COLUMN, failed_column=SHARD_FAILED,
                            expected={t.uri: t.rows for t in plan.tasks})
    assert thin[plan.tasks[0].uri] == "incomplete: 70 of its 71 rows came back from generation"
    assert [(p["id"], p["rotation"]) for p in predictions[:4]] == [("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    assert len(predictions) == 141 and predictions[-1]["error"].startswith("bad row")
    metrics = evaluation_metrics([bench], predictions, model="m", model_identity="x", run_id="r",
                                 failed_shards=failed, seconds=1.0)
    overall = metrics["benchmarks"]["mc"]["overall"]
    # "A" is right in exactly one rotation of every two-option question: circular accuracy 0.
    assert (overall["count"], overall["correct"], overall["errors"], overall["single_pass_accuracy"]) == (71, 0, 1, 35 / 71)
    assert metrics["status"] == "partial"
    outputs = write_outputs(storage, parse_uri(str(tmp_path / "out")), predictions, metrics)
    table = pq.read_table(outputs["predictions"])
    assert table.num_rows == 141 and sum(table.column("correct").to_pylist()) == 70
    saved = json.loads(Path(outputs["metrics"]).read_text())
    assert saved["benchmarks"]["mc"]["overall"] == json.loads(json.dumps(overall))
    assert "| mc | all | 71 | 0 | 0.0 % | 1 | 0 |" in Path(outputs["metrics_md"]).read_text()


def test_finetune_evaluate_section_is_checked_before_training(tmp_path: Path, tiny_model: Path) -> None:
    from jobs.specs import FinetuneSpec, build_spec
    from pipelines.evaluate.after_training import check_evaluation

    write(tmp_path / "mc" / "part-0.parquet", rows(3))
    spec = build_spec(FinetuneSpec, dict(
        data=str(tmp_path), output=str(tmp_path / "runs"), name="r", base_model=str(tiny_model), max_steps=1,
        evaluate={"benchmarks": [{"name": "mc", "data": str(tmp_path / "mc"), "kind": "multiple_choice"}]}))
    check_evaluation(spec, Storage())  # one node: fine
    with pytest.raises(SpecError) as err:
        check_evaluation(spec, Storage(), nodes=2)
    assert err.value.field == "evaluate.benchmarks.0.data" and "shared_paths" in str(err.value)
    check_evaluation(spec.model_copy(update={"shared_paths": [str(tmp_path)]}), Storage(), nodes=2)
    with pytest.raises(SpecError, match="evaluate.benchmarks.0.kind"):
        build_spec(FinetuneSpec, {**spec.model_dump(), "evaluate": {"benchmarks": [
            {"name": "mc", "data": "x", "kind": "essay"}]}})
