"""Data preparation, LLaVA-style JSON and images (issue 4): shards are read back with pyarrow
and images decoded with PIL; the S3 case runs on the suite's shared SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from s3server import S3Server, ensure_bucket  # tests/ is on pytest's pythonpath

from jobs.prepare import main
from pipelines.prepare import LLAVA_SCHEMA, SUMMARY_NAME, InvalidRecord, PrepareError, normalize_conversations
from pipelines.prepare.llava import prepare_llava

REPO = Path(__file__).resolve().parents[1]


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --- LLaVA ----------------------------------------------------------------------------------


@pytest.fixture()
def llava_images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (16, 12), (200, 10, 10)).save(root / "a.png")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(root / "sub" / "b.jpg", quality=90)
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(root / "c.webp")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "notimage.png").write_text("this is not a PNG")
    Image.new("RGB", (4, 4)).save(tmp_path / "outside.png")  # exists, but outside --images
    return root


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_llava_json_array_to_shards(tmp_path: Path, llava_images: Path) -> None:
    records = [
        {"id": "r0", "image": "a.png", "conversations": _turns("<image>\nWhat colour?", "Red.")},
        {"id": "r1", "image": "missing.png", "conversations": _turns("<image>\nHi", "x")},
        {"id": 2, "image": "sub/b.jpg", "conversations": _turns("Describe.", "Green.")},  # no <image> yet
        {"id": "r3", "conversations": _turns("What is 2+2?", "4")},  # text-only
        {"id": "r4", "image": "truncated.jpg", "conversations": _turns("<image>", "x")},
        {"id": "r5", "image": "notimage.png", "conversations": _turns("<image>", "x")},
        {"id": "r6", "image": "../outside.png", "conversations": _turns("<image>", "x")},
        {"id": "r7", "image": "c.webp", "conversations": [
            {"role": "user", "content": "<image>\nShape?"},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": "Colour?"},
            {"role": "assistant", "content": "Blue."},
        ]},
        {"id": "r8", "image": "a.png"},  # no conversations
        {"id": "r9", "conversations": _turns("<image>\nHi", "x")},  # text-only with <image>
        {"id": "r10", "image": "sub", "conversations": _turns("<image>", "x")},  # a folder
        "not an object",
    ]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records))
    out = tmp_path / "out"
    summary = prepare_llava(json_path, llava_images, str(out), shard_rows=2, workers=2)

    names = sorted(p.name for p in out.glob("*.parquet"))
    assert names == ["part-00000.parquet", "part-00001.parquet"]
    assert [pq.ParquetFile(out / n).metadata.num_rows for n in names] == [2, 2]
    table = pa.concat_tables([pq.read_table(out / n) for n in names])
    assert table.schema.equals(LLAVA_SCHEMA)
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["r0", "2", "r3", "r7"]  # input order kept
    assert all(r["caption"] is None for r in rows)
    # The original encoded bytes are embedded unchanged, and still decode.
    assert rows[0]["image"] == (llava_images / "a.png").read_bytes()
    assert rows[1]["image"] == (llava_images / "sub" / "b.jpg").read_bytes()
    assert rows[3]["image"] == (llava_images / "c.webp").read_bytes()
    assert _decode(rows[1]["image"]).size == (20, 20) and _decode(rows[3]["image"]).format == "WEBP"
    assert rows[2]["image"] is None
    assert rows[0]["conversations"] == [
        {"role": "user", "content": "<image>\nWhat colour?"},
        {"role": "assistant", "content": "Red."},
    ]
    assert rows[1]["conversations"][0]["content"] == "<image>\nDescribe."
    assert [t["role"] for t in rows[3]["conversations"]] == ["user", "assistant", "user", "assistant"]

    missing = {m.id: m for m in summary.missing_images}
    assert set(missing) == {"r1", "r4", "r5", "r6", "r10"}
    assert missing["r1"].reason == "file not found" and missing["r1"].image == "missing.png"
    assert missing["r4"].reason.startswith("cannot decode")
    assert missing["r5"].reason.startswith("cannot decode")
    assert "leaves the --images folder" in missing["r6"].reason
    assert missing["r1"].where == "record 2"
    invalid = {m.where: m for m in summary.invalid_records}
    assert set(invalid) == {"record 9", "record 10", "record 12"}
    assert "conversations" in invalid["record 9"].reason and invalid["record 9"].id == "r8"
    assert "<image>" in invalid["record 10"].reason
    assert (summary.rows_written, summary.records_read, summary.text_only_rows) == (4, 12, 1)

    written = json.loads((out / SUMMARY_NAME).read_text())
    assert written["rows_written"] == 4
    assert [m["id"] for m in written["missing_images"]] == ["r1", "r4", "r5", "r6", "r10"]
    report = summary.format()
    assert "4 rows in 2 shards" in report and "missing or unreadable images (rows skipped): 5" in report


def test_llava_jsonl_with_bad_lines(tmp_path: Path, llava_images: Path) -> None:
    lines = [
        json.dumps({"id": "a", "image": "a.png", "conversations": [
            {"role": "User", "content": "<image> what?"}, {"role": "assistant", "content": "red"}]}),
        "",
        "{not json",
        json.dumps({"id": "b", "image": "", "conversations": _turns("hello", "hi")}),
        json.dumps({"id": "c", "conversations": [{"from": "system", "value": "x"}, {"from": "gpt", "value": "y"}]}),
        json.dumps({"id": "d", "image": ["a.png", "a.png"], "conversations": _turns("<image>", "x")}),
    ]
    # Named .json on purpose: JSON lines are recognised by content, not by extension.
    json_path = tmp_path / "data.json"
    json_path.write_text("\n".join(lines) + "\n")
    summary = prepare_llava(json_path, llava_images, str(tmp_path / "out"))
    table = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert table["id"].to_pylist() == ["a", "b"]
    assert table["image"].to_pylist()[1] is None
    assert [(m.where, m.id) for m in summary.invalid_records] == [("line 3", None), ("line 5", "c"), ("line 6", "d")]
    assert "not valid JSON" in summary.invalid_records[0].reason
    assert "'system'" in summary.invalid_records[1].reason
    assert "2 images" in summary.invalid_records[2].reason
    assert summary.missing_images == []


def test_llava_nothing_usable_fails_and_writes_nothing(tmp_path: Path, llava_images: Path) -> None:
    json_path = tmp_path / "data.jsonl"
    json_path.write_text(json.dumps({"id": "x", "image": "nope.png", "conversations": _turns("<image>", "y")}) + "\n")
    with pytest.raises(PrepareError, match="no rows to write.*--images"):
        prepare_llava(json_path, llava_images, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_llava_bad_arguments_name_the_flag(tmp_path: Path, llava_images: Path) -> None:
    json_path = tmp_path / "data.json"
    json_path.write_text("[]")
    with pytest.raises(PrepareError, match="--json"):
        prepare_llava(tmp_path / "absent.json", llava_images, str(tmp_path / "out"))
    with pytest.raises(PrepareError, match="--images"):
        prepare_llava(json_path, tmp_path / "absent", str(tmp_path / "out"))
    (tmp_path / "broken.json").write_text('[{"id": 1}, ')
    with pytest.raises(PrepareError, match="--json.*not valid JSON"):
        prepare_llava(tmp_path / "broken.json", llava_images, str(tmp_path / "out"))
    (tmp_path / "empty.json").write_text("  \n")
    with pytest.raises(PrepareError, match="--json.*empty"):
        prepare_llava(tmp_path / "empty.json", llava_images, str(tmp_path / "out"))


def test_normalize_conversations() -> None:
    turns = np.array([{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], dtype=object)
    assert normalize_conversations(turns) == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert normalize_conversations(turns, has_image=True)[0]["content"] == "<image>\nq"
    for bad, fragment in [
        ([], "non-empty"),
        ([{"from": "gpt", "value": "a"}], "first turn"),
        ([{"from": "human", "value": "q"}], "no assistant"),
        ([{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}], "'value' or 'content'"),
        ([{"from": "robot", "value": "q"}], "role 'robot'"),
        ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}], "2 <image>"),
    ]:
        with pytest.raises(InvalidRecord, match=fragment):
            normalize_conversations(bad, has_image=True)


# --- command line ---------------------------------------------------------------------------


def test_cli_llava_and_errors(tmp_path: Path, llava_images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    json_path = tmp_path / "data.jsonl"
    json_path.write_text(
        json.dumps({"id": "ok", "image": "a.png", "conversations": _turns("<image>", "red")}) + "\n"
        + json.dumps({"id": "gone", "image": "gone.png", "conversations": _turns("<image>", "x")}) + "\n"
    )
    out = tmp_path / "out"
    argv = ["llava", "--json", str(json_path), "--images", str(llava_images), "--output", str(out)]
    assert main(argv + ["--shard-rows", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 rows in 1 shard" in printed and "'gone'" in printed and "file not found" in printed
    assert main(argv) == 2  # output already used
    assert "--overwrite" in capsys.readouterr().err
    assert main(["digits", "--output", str(tmp_path / "d"), "--shard-rows", "0"]) == 2
    assert "--shard-rows" in capsys.readouterr().err
    assert main(["digits", "--output", str(tmp_path / "d"), "--test-fraction", "1.5"]) == 2
    assert "--test-fraction" in capsys.readouterr().err
    assert main(["--help"]) == 0


def test_module_entrypoint(tmp_path: Path, llava_images: Path) -> None:
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps([{"id": "t", "conversations": _turns("hi", "hello")}]))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.prepare", "llava",
         "--json", str(json_path), "--images", str(llava_images), "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 rows in 1 shard" in proc.stdout
    assert pq.read_table(out / "part-00000.parquet")["id"].to_pylist() == ["t"]


# --- S3 output (a real SeaweedFS server on loopback) -----------------------------------------


def test_llava_to_s3(s3_server: S3Server, tmp_path: Path, llava_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyarrow import fs as pafs

    # Credentials reach pipelines.storage the standard way: AWS_* variables.
    for name, value in {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                        "AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_REGION": s3_server.region}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    ensure_bucket(s3_server.client(), "prep")
    records = [{"id": f"r{i}", "image": "a.png" if i != 2 else "gone.png",
                "conversations": _turns("<image>\nColour?", "Red.")} for i in range(5)]
    json_path = tmp_path / "data.json"
    json_path.write_text(json.dumps(records))

    summary = prepare_llava(json_path, llava_images, "s3://prep/llava", shard_rows=2)
    assert summary.rows_written == 4 and [m.id for m in summary.missing_images] == ["r2"]
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="prep", Prefix="llava/")["Contents"])
    assert keys == ["llava/_SUMMARY.json", "llava/part-00000.parquet", "llava/part-00001.parquet"]
    s3fs = pafs.S3FileSystem(endpoint_override=s3_server.endpoint_url.removeprefix("http://"), scheme="http",
                             access_key=s3_server.access_key, secret_key=s3_server.secret_key, region="us-east-1")
    table = pq.read_table("prep/llava", filesystem=s3fs)  # the summary file is not read as data
    assert sorted(table["id"].to_pylist()) == ["r0", "r1", "r3", "r4"]
    assert table["image"][0].as_py() == (llava_images / "a.png").read_bytes()

    with pytest.raises(PrepareError, match="--overwrite"):
        prepare_llava(json_path, llava_images, "s3://prep/llava", shard_rows=10)
    prepare_llava(json_path, llava_images, "s3://prep/llava", shard_rows=10, overwrite=True)
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket="prep", Prefix="llava/")["Contents"])
    assert keys == ["llava/_SUMMARY.json", "llava/part-00000.parquet"]  # no stale shard, no markers
    with pytest.raises(PrepareError, match="--output.*bucket does not exist"):
        prepare_llava(json_path, llava_images, "s3://absent-bucket/x")
