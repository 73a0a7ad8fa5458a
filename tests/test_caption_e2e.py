"""End-to-end captioning on one shared local Ray with a tiny TroL model: local and S3
storage, two predictor actors, resume after a partial run, bad rows and unreadable shards."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from jobs.caption import main
from jobs.specs import CaptionSpec, build_spec
from pipelines.caption import run_caption
from pipelines.storage import Storage, parse_uri

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

FAST = {"batch_size": 4, "dtype": "float32", "generation": {"max_new_tokens": 6}, "id_columns": ["id", "n"]}


def caption(**fields) -> dict:
    return run_caption(build_spec(CaptionSpec, {**FAST, **fields}))


def read_local(folder: Path) -> dict[str, pa.Table]:
    return {p.name: pq.read_table(p) for p in sorted(folder.glob("*.parquet"))}


def predictor_actors() -> set[str]:
    """IDs of every predictor actor this Ray has run (alive or finished), from the GCS."""
    from ray._private import state  # the public state API needs the dashboard, off in tests

    return {aid for aid, info in state.actors().items() if "CaptionPredictor" in str(info.get("ActorClassName"))}


def check_captions(table: pa.Table, model: str) -> None:
    assert table.column_names == ["id", "n", "caption", "error", "num_tokens", "model"]
    assert table.schema.field("n").type == pa.int64()  # id columns keep their type
    assert table.column("error").null_count == table.num_rows
    assert all(isinstance(c, str) for c in table.column("caption").to_pylist())
    assert all(1 <= t <= 6 for t in table.column("num_tokens").to_pylist())
    assert set(table.column("model").to_pylist()) <= {model}


def test_local_to_local_then_rerun_skips(tiny_model: Path, write_shards, tmp_path: Path, capsys) -> None:
    rows = write_shards(str(tmp_path / "in"), [5, 3, 0])
    spec = {**FAST, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": str(tiny_model)}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main([str(tmp_path / "spec.yaml")]) == 0  # the CLI, on the session's Ray
    printed = capsys.readouterr().out
    assert "3 committed" in printed and "images/s" in printed

    outputs = read_local(tmp_path / "out")
    assert list(outputs) == ["part-000.parquet", "part-001.parquet", "part-002.parquet"]  # named after inputs
    for name, table in outputs.items():
        check_captions(table, str(tiny_model))
        expected = [r["id"] for r in rows if r["id"].startswith(f"{int(name[5:8])}-")]
        assert table.column("id").to_pylist() == expected  # every row once, in input order
    stats = json.loads((tmp_path / "out" / "_stats" / "part-000.parquet.json").read_text())
    assert stats["rows"] == 5 and stats["errors"] == 0 and stats["input"] == str(tmp_path / "in" / "part-000.parquet")
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert (summary["rows_in"], summary["rows_out"], summary["errors"], summary["shards_committed"]) == (8, 8, 0, 3)
    assert summary["images_per_s"] > 0 and summary["tokens_per_s"] > 0 and summary["wall_seconds"] > 0
    assert summary["spec"]["model"] == str(tiny_model) and sum(summary["rows_per_actor"].values()) == 8

    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}
    again = run_caption(build_spec(CaptionSpec, spec))
    assert (again["shards_skipped"], again["shards_committed"], again["rows_in"]) == (3, 0, 0)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*.parquet")}


def test_s3_to_s3_two_actors_model_from_s3(tiny_model: Path, s3_env, make_bucket, write_shards, tmp_path: Path) -> None:
    """Ray's workers started before these AWS_* variables existed: the credentials reach
    them only through the job's own Storage, as they would on a remote cluster. Two
    predictor actors share the rows of four shards."""
    bucket = make_bucket("caption")
    client = s3_env.client()
    for f in tiny_model.iterdir():
        client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    rows = write_shards(f"s3://{bucket}/data/in", [6, 6, 6, 6], client=client)
    model = f"s3://{bucket}/models/tiny/"
    cache = tmp_path / "cache"
    before = predictor_actors()
    summary = caption(input=f"s3://{bucket}/data/in/", output=f"s3://{bucket}/data/out", model=model,
                      model_cache_dir=str(cache), storage={"endpoint_url": s3_env.endpoint_url},
                      concurrency=2, cpus_per_actor=0.5, batch_size=2)
    assert (summary["rows_out"], summary["shards_committed"], summary["shards_failed"]) == (24, 4, 0)
    # A pool of two ran. How rows spread over them is Ray's call: with a model this fast the
    # first actor to come up may take most batches, so only the total is exact.
    pool = predictor_actors() - before
    assert len(pool) == 2
    assert set(summary["rows_per_actor"]) <= pool and sum(summary["rows_per_actor"].values()) == 24

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="data/out/")["Contents"])
    names = [f"part-00{k}.parquet" for k in range(4)]
    assert keys == sorted(["data/out/_RUN.json", "data/out/_SUMMARY.json"] + [f"data/out/{n}" for n in names]
                          + [f"data/out/_stats/{n}.json" for n in names])
    st = Storage.from_environment(s3_env.endpoint_url)
    ids = []
    for name in names:
        table = pq.read_table(io.BytesIO(st.read_bytes(parse_uri(f"s3://{bucket}/data/out/{name}"))))
        check_captions(table, model)
        ids += table.column("id").to_pylist()
    assert ids == [r["id"] for r in rows]  # shard by shard, in input order, each row once
    # Downloaded once into the node cache: one full copy (plus the light processor-only copy).
    full = [d for d in cache.iterdir() if d.is_dir() and (d / "model.safetensors").exists()]
    assert len(full) == 1 and (full[0] / "config.json").exists()


def test_rerun_after_partial_run_redoes_only_the_rest(tiny_model: Path, write_shards, tmp_path: Path) -> None:
    rows = write_shards(str(tmp_path / "in"), [3, 3, 3, 3])
    common = {"output": str(tmp_path / "out"), "model": str(tiny_model)}
    first = caption(input=str(tmp_path / "in" / "part-00[01].parquet"), **common)  # a run that did half
    assert first["shards_committed"] == 2
    out = tmp_path / "out"
    # A crash between shard 1's PUT and its marker, and a stray object for shard 2:
    (out / "_stats" / "part-001.parquet.json").unlink()
    (out / "part-002.parquet").write_bytes(b"half-written leftovers")

    second = caption(input=str(tmp_path / "in"), **common)
    assert (second["shards_skipped"], second["shards_committed"], second["rows_in"]) == (1, 3, 9)
    run_ids = {p.name: json.loads(p.read_text())["run_id"] for p in (out / "_stats").glob("*.json")}
    assert run_ids["part-000.parquet.json"] == first["run_id"]
    assert {run_ids[f"part-00{k}.parquet.json"] for k in (1, 2, 3)} == {second["run_id"]}
    union = [i for t in read_local(out).values() for i in t.column("id").to_pylist()]
    assert sorted(union) == sorted(r["id"] for r in rows) and len(union) == len(set(union))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_bad_rows_and_unreadable_shards_never_crash(tiny_model: Path, sample_images, tmp_path: Path) -> None:
    good = sample_images["astronaut"]
    huge = Image.new("1", (8000, 8000))  # 64 MP, over the default 50 MP limit, a tiny PNG
    cells = {
        "good": (good, True), "corrupt": (b"\x89PNG\r\n\x1a\nnot really", False), "empty": (b"", False),
        "gray": (encode(Image.new("L", (40, 30), 90), "PNG"), True),
        "cmyk": (encode(Image.new("CMYK", (40, 30), (10, 200, 30, 0)), "JPEG"), True),
        "rgba": (encode(Image.new("RGBA", (40, 30), (255, 0, 0, 128)), "PNG"), True),
        "gray16": (encode(Image.fromarray(np.full((30, 40), 40000, np.uint16)), "PNG"), True),
        "huge": (encode(huge, "PNG"), False), "null": (None, False),
    }
    (tmp_path / "in" / "imgs").mkdir(parents=True)
    (tmp_path / "in" / "imgs" / "a.png").write_bytes(encode(Image.new("RGB", (20, 20), "blue"), "PNG"))
    pq.write_table(pa.table({"id": list(cells), "n": list(range(len(cells))),
                             "image": pa.array([c[0] for c in cells.values()], pa.binary())}),
                   tmp_path / "in" / "part-000.parquet")
    paths = {"relative": ("imgs/a.png", True), "absolute": (str(tmp_path / "in" / "imgs" / "a.png"), True),
             "missing": ("imgs/missing.png", False), "blank": ("", False)}
    pq.write_table(pa.table({"id": list(paths), "n": [0] * len(paths), "image": [p[0] for p in paths.values()]}),
                   tmp_path / "in" / "part-001.parquet")  # a string image column: paths
    # A shard whose footer reads fine but whose data pages are garbage.
    blob = io.BytesIO()
    pq.write_table(pa.table({"id": ["x"] * 50, "n": list(range(50)), "image": [os.urandom(2000) for _ in range(50)]}),
                   blob, compression="zstd")
    data = bytearray(blob.getvalue())
    data[100:60000] = os.urandom(59900)
    (tmp_path / "in" / "part-002.parquet").write_bytes(bytes(data))

    summary = caption(input=str(tmp_path / "in"), output=str(tmp_path / "out"), model=str(tiny_model))
    assert summary["shards_committed"] == 2 and summary["shards_failed"] == 1
    assert "part-002.parquet" in next(iter(summary["failed"])) and "reading shard failed" in next(
        iter(summary["failed"].values()))
    outputs = read_local(tmp_path / "out")
    assert sorted(outputs) == ["part-000.parquet", "part-001.parquet"]  # the broken shard is not committed
    for name, expected in (("part-000.parquet", cells), ("part-001.parquet", paths)):
        table = outputs[name]
        for row in table.to_pylist():
            ok = expected[row["id"]][1]
            assert (row["error"] is None) == ok, row
            assert (row["caption"] is not None) == ok and (row["num_tokens"] is not None) == ok, row
    errors = {r["id"]: r["error"] for t in outputs.values() for r in t.to_pylist() if r["error"]}
    assert "over the limit" in errors["huge"] and "not found" in errors["missing"]
    assert summary["errors"] == len(errors) == 6
