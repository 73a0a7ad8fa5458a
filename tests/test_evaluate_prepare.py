"""`python -m jobs.prepare eval-*`: benchmark files → shards with image bytes (no Ray)."""

from __future__ import annotations

import base64
import glob
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.prepare import main as prepare
from pipelines.evaluate.benchmark_spec import BenchmarkSpec
from pipelines.evaluate.rows import ask
from pipelines.prepare.benchmarks import EVAL_SCHEMA


def png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format="PNG")
    return buf.getvalue()


def read(folder: Path) -> list[dict]:
    table = pq.read_table(sorted(glob.glob(str(folder / "*.parquet"))))
    assert table.schema.equals(EVAL_SCHEMA)
    return table.to_pylist()


def test_mmbench_tsv(tmp_path: Path) -> None:
    red = base64.b64encode(png("red")).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    lines = [header,
             f"10\tWhat colour?\tA square.\tred\tblue\t\t\tA\tcolour\t{red}",
             "11\tIs it warm?\t\tyes\tno\tmaybe\t\tA\tmood\t10",          # the image of row 10, by reference
             "12\tBroken\t\tx\ty\t\t\tB\tcolour\tnot-base64!",
             "13\tNo answer\t\tx\ty\t\t\t\tcolour\t" + red,
             "14\tGap\t\tx\t\tz\t\tA\tcolour\t" + red,
             "15\tBad answer\t\tx\ty\t\t\tD\tcolour\t" + red]
    (tmp_path / "mmb.tsv").write_text("\n".join(lines) + "\n")
    assert prepare(["eval-mmbench", "--tsv", str(tmp_path / "mmb.tsv"), "--output", str(tmp_path / "out")]) == 0
    rows = read(tmp_path / "out")
    assert [r["id"] for r in rows] == ["10", "11"]
    assert rows[0]["choices"] == ["red", "blue"] and rows[0]["hint"] == "A square." and rows[0]["answer"] == "A"
    assert rows[1]["image"] == rows[0]["image"] == png("red") and rows[1]["choices"] == ["yes", "no", "maybe"]
    summary = json.loads((tmp_path / "out" / "_SUMMARY.json").read_text())
    assert summary["records_read"] == 6 and [m["id"] for m in summary["missing_images"]] == ["12"]
    reasons = {r["id"]: r["reason"] for r in summary["invalid_records"]}
    assert set(reasons) == {"13", "14", "15"} and "no answer" in reasons["13"] and "option B is empty" in reasons["14"]
    [asked] = ask(rows[0], BenchmarkSpec(name="m", data="x", kind="multiple_choice"), "p")
    assert asked["prompt"].startswith("A square.\nWhat colour?\nA. red\nB. blue\n")


def test_yes_no_and_llava_json(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png("red"))
    (images / "bad.png").write_bytes(b"not an image")
    pope = [{"question_id": 1, "image": "a.png", "text": "Is there a red square?", "label": "yes"},
            {"question_id": 2, "image": "a.png", "text": "Is there a dog?", "label": "no", "category": "popular"},
            {"question_id": 3, "image": "bad.png", "text": "Is it?", "label": "yes"},
            {"question_id": 4, "image": "missing.png", "text": "Is it?", "label": "no"},
            {"question_id": 5, "image": "a.png", "text": "Is it?", "label": "perhaps"}]
    (tmp_path / "pope.jsonl").write_text("\n".join(json.dumps(r) for r in pope) + "\n")
    assert prepare(["eval-yes-no", "--json", str(tmp_path / "pope.jsonl"), "--images", str(images),
                    "--output", str(tmp_path / "yn"), "--category", "adversarial"]) == 0
    rows = read(tmp_path / "yn")
    assert [(r["id"], r["answer"], r["category"], r["image_id"]) for r in rows] == [
        ("1", "yes", "adversarial", "a.png"), ("2", "no", "popular", "a.png")]
    summary = json.loads((tmp_path / "yn" / "_SUMMARY.json").read_text())
    assert {m["id"] for m in summary["missing_images"]} == {"3", "4"}
    assert [r["id"] for r in summary["invalid_records"]] == ["5"]

    llava = [{"id": "c1", "image": "a.png", "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
                {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "a square"}]},
             {"question_id": "q2", "image": "a.png", "question": "Which?", "choices": ["dog", "square"],
              "answer": "square", "category": "shape"},
             {"id": "q3", "image": "a.png", "question": "Which?", "choices": ["dog", "cat"], "answer": "square"}]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    assert prepare(["eval-llava", "--json", str(tmp_path / "llava.json"), "--images", str(images),
                    "--output", str(tmp_path / "ll")]) == 0
    rows = read(tmp_path / "ll")
    assert [(r["id"], r["question"], r["answer"]) for r in rows] == [
        ("c1-0", "What colour is it?", "Red."), ("c1-1", "What shape?", "a square"), ("q2", "Which?", "square")]
    assert rows[2]["choices"] == ["dog", "square"] and rows[2]["category"] == "shape"
    assert json.loads((tmp_path / "ll" / "_SUMMARY.json").read_text())["invalid_records"][0]["id"] == "q3"


def test_digits_choice_is_the_held_out_split(tmp_path: Path) -> None:
    assert prepare(["eval-digits", "--output", str(tmp_path / "mc"), "--image-size", "16"]) == 0
    assert prepare(["digits", "--output", str(tmp_path / "digits"), "--image-size", "16"]) == 0
    rows = read(tmp_path / "mc")
    train = pq.read_table(glob.glob(str(tmp_path / "digits" / "train" / "*.parquet"))).column("id").to_pylist()
    test = pq.read_table(sorted(glob.glob(str(tmp_path / "digits" / "test" / "*.parquet"))))
    assert [r["id"] for r in rows] == test.column("id").to_pylist() and not set(train) & {r["id"] for r in rows}
    assert [r["image"] for r in rows] == test.column("image").to_pylist()
    labels = test.column("label").to_pylist()
    assert [r["answer"] for r in rows] == ["ABCDEFGHIJ"[label] for label in labels]
    assert rows[0]["choices"] == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert {r["category"] for r in rows} == set(rows[0]["choices"])


def test_eval_prepare_errors_name_the_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert prepare(["eval-mmbench", "--tsv", str(tmp_path / "none.tsv"), "--output", str(tmp_path / "o")]) == 2
    assert "--tsv" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_text("question\tanswer\nq\tA\n")
    assert prepare(["eval-mmbench", "--tsv", str(tmp_path / "bad.tsv"), "--output", str(tmp_path / "o")]) == 2
    assert "no image, index column(s)" in capsys.readouterr().err
    assert prepare(["eval-yes-no", "--json", str(tmp_path / "bad.tsv"), "--images", str(tmp_path / "nowhere"),
                    "--output", str(tmp_path / "o")]) == 2
    assert "--images" in capsys.readouterr().err
