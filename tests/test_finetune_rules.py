"""Driver-side rules of a fine-tuning run, checked before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipelines.finetune.job as finetune
from jobs.specs import FinetuneSpec, SpecError, build_spec
from pipelines.finetune import run_finetune
from pipelines.storage import Storage, parse_uri
from pipelines.finetune.runs import check_nodes


def spec_with(tmp_path: Path, **overrides) -> FinetuneSpec:
    data = dict(data=str(tmp_path / "data"), output=str(tmp_path / "runs"), name="run",
                base_model=str(tmp_path / "model"), stage="1", max_steps=4)
    data.update(overrides)
    return build_spec(FinetuneSpec, data)


def stored_run(tmp_path: Path, spec: FinetuneSpec) -> None:
    """A run folder as an earlier attempt leaves it: its spec and a checkpoint."""
    run = tmp_path / "runs" / "run"
    (run / "checkpoint_2026-01-01_00-00-00.000000").mkdir(parents=True)
    (run / "checkpoint_2026-01-01_00-00-00.000000" / "training_state.pt").write_bytes(b"x")
    (run / "_SPEC.json").write_text(json.dumps(spec.model_dump(mode="json")))


@pytest.mark.parametrize("change, field", [
    ({"batch_size": 4}, "batch_size"),
    ({"workers": 2}, "workers"),
    ({"stage": "2"}, "stage"),
    ({"lora": {"r": 8}}, "lora"),
    ({"seed": 1}, "seed"),
    ({"grad_accum": 2}, "grad_accum"),
])
def test_a_resume_that_would_change_shapes_or_data_order_is_refused(tmp_path, change, field):
    stored_run(tmp_path, spec_with(tmp_path))
    with pytest.raises(SpecError) as err:
        finetune._record_spec(spec_with(tmp_path, **change), Storage.from_environment(),
                              parse_uri(str(tmp_path / "runs" / "run")))
    assert err.value.field == field and "new name" in str(err.value)


def test_a_resume_may_change_the_schedule_and_logging(tmp_path):
    stored_run(tmp_path, spec_with(tmp_path))
    changed = spec_with(tmp_path, lr=1e-3, max_steps=10, log_every=2, checkpoint_every=5)
    finetune._record_spec(changed, Storage.from_environment(), parse_uri(str(tmp_path / "runs" / "run")))
    assert json.loads((tmp_path / "runs" / "run" / "_SPEC.json").read_text())["max_steps"] == 10


def test_without_checkpoints_a_changed_spec_starts_afresh(tmp_path):
    run = tmp_path / "runs" / "run"
    run.mkdir(parents=True)
    (run / "_SPEC.json").write_text(json.dumps(spec_with(tmp_path).model_dump(mode="json")))
    finetune._record_spec(spec_with(tmp_path, batch_size=4), Storage.from_environment(), parse_uri(str(run)))
    assert json.loads((run / "_SPEC.json").read_text())["batch_size"] == 4


def test_several_nodes_need_output_on_s3_or_a_declared_shared_path(tmp_path):
    local = spec_with(tmp_path)
    check_nodes(local, nodes=1, base_model_is_local=True)  # one node: local folders are fine
    with pytest.raises(SpecError) as err:
        check_nodes(local, nodes=2, base_model_is_local=True)
    assert err.value.field == "output" and "shared_paths" in str(err.value)
    shared = spec_with(tmp_path, shared_paths=[str(tmp_path)])
    check_nodes(shared, nodes=3, base_model_is_local=True)
    on_s3 = spec_with(tmp_path, output="s3://bucket/runs", shared_paths=[str(tmp_path / "data")])
    with pytest.raises(SpecError) as err:
        check_nodes(on_s3, nodes=2, base_model_is_local=True)
    assert err.value.field == "base_model", "data tasks and workers on other nodes read the base model too"


def test_run_finetune_applies_the_node_rule_before_any_model_loads(tmp_path, tiny_model, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"image": [None], "caption": ["a caption"]}), tmp_path / "data" / "part.parquet")
    monkeypatch.setattr(finetune, "cluster_node_count", lambda: 2)
    with pytest.raises(SpecError) as err:
        run_finetune(spec_with(tmp_path, base_model=str(tiny_model), shared_paths=[str(tiny_model.parent)]))
    assert err.value.field == "output"
    assert not (tmp_path / "runs").exists(), "refused before anything was written"


def test_fsdp_with_4bit_weights_is_refused_by_the_spec(tmp_path):
    with pytest.raises(SpecError) as err:
        spec_with(tmp_path, stage="2", quantize=4, gpus_per_worker=1, strategy="fsdp")
    assert "fsdp" in str(err.value) and "quantize" in str(err.value)
