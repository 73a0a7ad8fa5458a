"""Caption spec parsing and every spec error that must surface before a model loads."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.caption import main
from jobs.specs import CaptionSpec, SpecError, apply_overrides, build_spec, load_spec
from pipelines.caption import plan_caption

REPO = Path(__file__).resolve().parent.parent


def spec_of(**fields) -> CaptionSpec:
    return build_spec(CaptionSpec, fields)


@pytest.fixture
def fake_model(tmp_path: Path) -> Path:
    """config.json plus garbage weights: loading it would fail loudly, so any spec error
    seen instead proves the check ran first."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"not weights")
    return d


@pytest.fixture
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"id": [f"{k}-0", f"{k}-1"], "image": [b"x", b"y"]}), d / f"part-{k}.parquet")
    return d


@pytest.mark.parametrize("name", ["caption_local.yaml", "caption_s3.yaml"])
def test_examples_are_valid(name: str) -> None:
    spec = load_spec(CaptionSpec, REPO / "jobs" / "examples" / name)
    assert spec.id_columns and spec.batch_size >= 1


def test_overrides_parse_types_and_nesting(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("input: a\noutput: b\nmodel: m\n")
    spec = load_spec(CaptionSpec, path, ["batch_size=16", "generation.do_sample=true", "generation.top_p=0.5",
                                         "id_columns=[id, url]", "prompt=Caption: short", "storage.region=eu-west-1",
                                         "model_cache_dir=null"])
    assert spec.batch_size == 16 and spec.generation.do_sample and spec.generation.top_p == 0.5
    assert spec.id_columns == ["id", "url"] and spec.prompt == "Caption: short"
    assert spec.storage.region == "eu-west-1" and spec.model_cache_dir is None
    with pytest.raises(SpecError, match="not key=value"):
        apply_overrides({}, ["batch_size"])
    with pytest.raises(SpecError) as err:
        apply_overrides({"prompt": "x"}, ["prompt.sub=1"])
    assert err.value.field == "prompt"


@pytest.mark.parametrize(
    ("fields", "field", "text"),
    [
        ({"output": "b", "model": "m"}, "input", "is required"),
        ({"input": "a", "output": "b", "model": "m", "batchsize": 8}, "batchsize", "unknown field"),
        ({"input": "a", "output": "b", "model": "m", "generation": {"max_tokens": 8}}, "generation.max_tokens",
         "unknown field"),
        ({"input": "a", "output": "b", "model": "m", "batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"input": "a", "output": "b", "model": "m", "dtype": "fp8"}, "dtype", "auto"),
        ({"input": "a", "output": "b", "model": "m", "id_columns": ["id", "caption"]}, "id_columns", "clashes"),
        ({"input": "a", "output": "b/*", "model": "m"}, "output", "not a glob"),
        ({"input": "a", "output": "b", "model": "m", "storage": {"endpoint_url": "minio:9000"}},
         "storage.endpoint_url", "http://"),
        ({"input": "a", "output": "b", "model": "m", "concurrency": [4, 2]}, "concurrency", "1 <= min <= max"),
        ({"input": "a", "output": "b", "model": "m", "concurrency": 0}, "concurrency", "[min, max]"),
        ({"input": "a", "output": "b", "model": "m", "actors": 2, "concurrency": 2}, "actors", "older name"),
        ({"input": "a", "output": "b", "model": "m", "stall_timeout_s": 0}, "stall_timeout_s", "greater than 0"),
    ],
)
def test_field_errors_name_the_field(fields: dict, field: str, text: str) -> None:
    with pytest.raises(SpecError) as err:
        spec_of(**fields)
    assert err.value.field == field and text in str(err.value)


def test_concurrency_is_a_size_or_a_range_and_actors_its_older_name() -> None:
    base = {"input": "a", "output": "b", "model": "m"}
    assert spec_of(**base).concurrency == 1
    assert spec_of(**base, concurrency=[1, 8]).concurrency == (1, 8)
    assert spec_of(**base, actors=3).concurrency == 3  # specs written before concurrency keep working
    assert load_spec(CaptionSpec, REPO / "cluster" / "specs" / "caption_l4.yaml").concurrency == (2, 8)


def test_secrets_in_a_spec_are_refused_without_echo() -> None:
    secret = "AKIA-TOPSECRET-VALUE-123"
    for data in ({"storage": {"aws_secret_access_key": secret}}, {"aws_secret_access_key": secret}):
        with pytest.raises(SpecError) as err:
            spec_of(input="a", output="b", model="m", **data)
        assert secret not in str(err.value)
    with pytest.raises(SpecError, match="AWS_SECRET_ACCESS_KEY"):
        spec_of(input="a", output="b", model="m", storage={"secret_key": secret})


def test_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("input: [unclosed\n")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="line 2"):
        load_spec(CaptionSpec, tmp_path / "bad.yaml")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(CaptionSpec, tmp_path / "list.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(CaptionSpec, tmp_path / "missing.yaml")


def test_plan_errors_name_the_field(tmp_path: Path, shards: Path, fake_model: Path) -> None:
    base = {"input": str(shards), "output": str(tmp_path / "out"), "model": str(fake_model), "id_columns": ["id"]}
    (tmp_path / "empty").mkdir()
    (tmp_path / "bare").mkdir()
    pq.write_table(pa.table({"id": [1], "image": [b"x"]}), tmp_path / "part-9.parquet")  # int id, outside input
    cases = [
        ({"image_column": "img"}, "image_column", "'img' is not in"),
        ({"id_columns": ["id", "url"]}, "id_columns", "'url' is not in"),
        ({"image_column": "id", "id_columns": []}, None, None),  # fine: a string column holds paths
        ({"input": str(tmp_path / "empty")}, "input", "no Parquet shards"),
        ({"input": str(tmp_path / "nowhere")}, "input", "nothing found"),
        ({"input": str(tmp_path / "*.parquet")}, None, None),
        ({"input": str(tmp_path / "**" / "part-*.parquet")}, "output", "inside the input"),
        # Each shard's output keeps its own id types (shards never share a batch): fine.
        ({"input": str(tmp_path / "**" / "part-*.parquet"), "output": f"{tmp_path}-out"}, None, None),
        ({"output": str(shards / "out")}, "output", "inside the input"),
        ({"model": str(tmp_path / "nomodel")}, "model", "does not exist"),
        ({"model": str(tmp_path / "bare")}, "model", "no config.json"),
        ({"model": "gs://bucket/model"}, "model", "neither"),
    ]
    for change, field, text in cases:
        spec = spec_of(**{**base, **change})
        if field is None:
            plan_caption(spec, claim=False)
            continue
        with pytest.raises(SpecError) as err:
            plan_caption(spec, claim=False)
        assert err.value.field == field, change
        assert text in str(err.value), change


def test_other_captions_in_output_are_refused(tmp_path: Path, shards: Path, fake_model: Path) -> None:
    spec = spec_of(input=str(shards), output=str(tmp_path / "out"), model=str(fake_model))
    plan = plan_caption(spec)  # claims the output (writes _RUN.json and the lease)
    for shard in plan.shards[:1]:  # pretend one shard was committed by that run
        Path(shard.out.path).write_bytes(b"x")
        Path(shard.stats.path).parent.mkdir(parents=True, exist_ok=True)
        Path(shard.stats.path).write_text("{}")
    again = plan_caption(spec, claim=False)  # same spec: stats that prove nothing are redone
    assert len(again.todo) == 2 and "changed since committed" in again.todo[0].why
    with pytest.raises(SpecError) as err:
        plan_caption(spec.model_copy(update={"prompt": "Another prompt."}), claim=False)
    assert err.value.field == "output" and "different prompt" in str(err.value)


def test_unwritable_output_fails_in_planning(tmp_path: Path, shards: Path, fake_model: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    spec = spec_of(input=str(shards), output=str(tmp_path / "file" / "out"), model=str(fake_model))
    with pytest.raises(SpecError) as err:
        plan_caption(spec)
    assert err.value.field == "output"


def test_plan_only_lists_and_writes_nothing(tmp_path: Path, shards: Path, fake_model: Path, capsys) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"input": str(shards), "output": str(tmp_path / "out"), "model": str(fake_model)}))
    assert main([str(path), "--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "2 to do (4 rows)" in out and "part-1.parquet" in out
    assert not (tmp_path / "out").exists()


def test_cli_spec_error_loads_no_model_code(tmp_path: Path, shards: Path, fake_model: Path) -> None:
    """A bad spec exits 2 naming the field, without importing torch, trol or ray."""
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"input": str(shards), "output": str(tmp_path / "out"),
                                    "model": str(fake_model), "image_column": "picture"}))
    code = textwrap.dedent(f"""
        import sys
        from jobs.caption import main
        rc = main([{str(path)!r}])
        loaded = sorted(m for m in ("torch", "trol", "ray", "transformers") if m in sys.modules)
        print("LOADED", loaded)
        sys.exit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "image_column: column 'picture' is not in" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "LOADED []" in proc.stdout


def test_wrong_s3_secret_is_a_clear_spec_error(s3_env, make_bucket, tmp_path: Path, fake_model: Path,
                                               monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    bucket = make_bucket()
    client = s3_env.client()
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a"], "image": [b"x"]}), buf)
    client.put_object(Bucket=bucket, Key="in/part-0.parquet", Body=buf.getvalue())
    spec = {"input": f"s3://{bucket}/in/", "output": f"s3://{bucket}/out/", "model": str(fake_model),
            "storage": {"endpoint_url": s3_env.endpoint_url}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(spec))
    wrong = "wrong-secret-" + s3_env.secret_key[-8:]
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    assert main([str(path)]) == 2
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "input" in captured.err and "rejected the credentials" in captured.err
    assert wrong not in text and s3_env.secret_key not in text
    # With the right secret the same spec plans fine; a missing bucket is named too.
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert main([str(path), "--plan-only"]) == 0
    path.write_text(json.dumps({**spec, "input": "s3://no-such-bucket-here/in/"}))
    assert main([str(path)]) == 2
    assert "does not exist" in capsys.readouterr().err
