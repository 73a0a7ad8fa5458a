"""Verified resume and planning decisions, without Ray: shards are committed with
commit_shard directly (what the run does once a shard's rows are in), then re-planned."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.caption import commit_shard, plan_caption
from pipelines.caption.lease import OutputLockedError, release_lease
from pipelines.specs import CaptionSpec, SpecError, build_spec


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights v1")
    return d


def write_shard(folder: Path, k: int, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(rows)], "image": [b"x"] * rows}),
                   folder / f"part-{k}.parquet")


def spec_for(tmp_path: Path, model: Path, **extra) -> CaptionSpec:
    return build_spec(CaptionSpec, {"input": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                    "model": str(model), "id_columns": ["id"], **extra})


def captioned(rows: int, errors: set[int] = frozenset()) -> pa.Table:
    return pa.table({"__row": pa.array(np.arange(rows), pa.int64()),
                     "caption": [None if i in errors else f"caption {i}" for i in range(rows)],
                     "error": pa.array(["bad image" if i in errors else None for i in range(rows)], pa.string()),
                     "num_tokens": pa.array([None if i in errors else 3 for i in range(rows)], pa.int32())})


def commit_all(spec: CaptionSpec, errors: set[int] = frozenset()) -> None:
    plan = plan_caption(spec)
    for shard in plan.todo:
        commit_shard(plan, shard, captioned(shard.rows, errors))
    release_lease(plan.storage, plan.output, plan.run_id)


def test_done_only_when_input_rows_spec_and_model_match(tmp_path: Path, model: Path) -> None:
    for k in range(3):
        write_shard(tmp_path / "in", k, 4)
    spec = spec_for(tmp_path, model)
    commit_all(spec)
    stats = json.loads((tmp_path / "out" / "_stats" / "part-0.parquet.json").read_text())
    assert {"input_size", "input_version", "rows", "fingerprint", "model_identity"} <= set(stats)
    assert plan_caption(spec, claim=False).todo == []

    write_shard(tmp_path / "in", 1, 5)  # replaced with other content
    os.utime(tmp_path / "in" / "part-2.parquet", ns=(1, 1))  # same bytes, another version (mtime)
    (tmp_path / "in" / "part-0.parquet").unlink()
    write_shard(tmp_path / "in", 3, 2)  # a new shard
    plan = plan_caption(spec, claim=False)
    why = {s.rel: s.why for s in plan.todo}
    assert set(why) == {"part-1.parquet", "part-2.parquet", "part-3.parquet"}
    assert "input size" in why["part-1.parquet"] and "row count" in why["part-1.parquet"]
    assert why["part-2.parquet"] == "changed since committed: input version (ETag/mtime)"
    assert why["part-3.parquet"] == "new"
    assert plan.orphans == [str(tmp_path / "out" / "part-0.parquet")]

    commit_all(spec)
    (model / "model.safetensors").write_bytes(b"weights v2, retrained")  # same folder, other weights
    plan = plan_caption(spec, claim=False)
    assert len(plan.todo) == 3 and all(s.why == "changed since committed: model" for s in plan.todo)


def test_retry_errors_plans_only_error_rows_and_merges_them(tmp_path: Path, model: Path) -> None:
    write_shard(tmp_path / "in", 0, 6)
    write_shard(tmp_path / "in", 1, 3)
    commit_all(spec_for(tmp_path, model), errors={1, 4})
    clean_one = (tmp_path / "out" / "part-1.parquet").read_bytes()
    assert plan_caption(spec_for(tmp_path, model), claim=False).todo == []  # errors alone do not redo
    plan = plan_caption(spec_for(tmp_path, model, retry_errors=True))
    assert [(s.rel, s.why) for s in plan.todo] == [("part-0.parquet", "retry_errors"), ("part-1.parquet", "retry_errors")]
    shard = plan.todo[0]
    assert shard.wanted.tolist() == [1, 4]
    fresh = captioned(6).take([1, 4])
    stats = commit_shard(plan, shard, fresh)
    assert stats["errors"] == 0 and stats["rows"] == 6 and stats["rows_captioned"] == 2
    out = pq.read_table(tmp_path / "out" / "part-0.parquet")
    assert out.column("caption").to_pylist() == [f"caption {i}" for i in range(6)]
    assert out.column("id").to_pylist() == [f"0-{i}" for i in range(6)]  # ids as the input has them
    assert (tmp_path / "out" / "part-1.parquet").read_bytes() == clean_one  # untouched until its turn


def test_bad_shards_fail_alone_in_planning(tmp_path: Path, model: Path) -> None:
    write_shard(tmp_path / "in", 0, 2)
    (tmp_path / "in" / "part-1.parquet").write_bytes(b"PAR1 not a footer PAR1")
    pq.write_table(pa.table({"id": ["a"], "picture": [b"x"]}), tmp_path / "in" / "part-2.parquet")
    pq.write_table(pa.table({"id": ["a"], "image": [1]}), tmp_path / "in" / "part-3.parquet")
    plan = plan_caption(spec_for(tmp_path, model), claim=False)
    assert [s.rel for s in plan.todo] == ["part-0.parquet"]
    unusable = {Path(k).name: v for k, v in plan.unusable.items()}
    assert set(unusable) == {"part-1.parquet", "part-2.parquet", "part-3.parquet"}
    assert "footer" in unusable["part-1.parquet"]
    assert unusable["part-2.parquet"].startswith("image_column: column 'image' is not in")
    assert "has type int64" in unusable["part-3.parquet"]
    (tmp_path / "in" / "part-0.parquet").unlink()
    with pytest.raises(SpecError) as err:  # no shard left that can work: the spec fails
        plan_caption(spec_for(tmp_path, model), claim=False)
    assert err.value.field in ("input", "image_column") and "no other of the 3 shards" in str(err.value)


def test_a_second_run_is_refused_while_the_first_holds_the_output(tmp_path: Path, model: Path) -> None:
    write_shard(tmp_path / "in", 0, 2)
    first = plan_caption(spec_for(tmp_path, model, lease_seconds=60))
    with pytest.raises(OutputLockedError, match="in use by run " + first.run_id):
        plan_caption(spec_for(tmp_path, model))
    assert plan_caption(spec_for(tmp_path, model), force=True).run_id != first.run_id


def test_commit_takes_ids_from_the_input_only_if_it_is_unchanged(tmp_path: Path, model: Path) -> None:
    from pipelines.caption.assembly import AssemblyError

    write_shard(tmp_path / "in", 0, 3)
    plan = plan_caption(spec_for(tmp_path, model))
    shard = plan.todo[0]
    write_shard(tmp_path / "in", 0, 4)  # replaced while the run captioned it
    with pytest.raises(AssemblyError, match="changed during the run"):
        commit_shard(plan, shard, captioned(3))
    assert not (tmp_path / "out" / "part-0.parquet").exists()
