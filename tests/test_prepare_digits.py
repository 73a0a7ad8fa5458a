"""Data preparation, scikit-learn's digits (issue 4): shards are read back with pyarrow and
images decoded with PIL."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from pipelines.prepare import DIGIT_PROMPT, DIGIT_WORDS, DIGITS_SCHEMA, SUMMARY_NAME, PrepareError
from pipelines.prepare.digits import digit_caption, parse_digit, prepare_digits, split_digits


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
