"""The TroL processor in users' own Ray Data pipelines: read_images over a folder, and
read_parquet with image bytes (per-row prompts) and with paths. Every input row comes out
once with caption, error and num_tokens; input columns pass through; internal columns never
leak; Ray's global DataContext is left as it was."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.caption import CaptionProcessorConfig, build_caption_processor
from pipelines.specs import SpecError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

FAST = {"batch_size": 4, "dtype": "float32", "generation": {"max_new_tokens": 3}}
OUT = {"caption", "error", "num_tokens"}


def png(color, size=(20, 14)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def rows_of(ds) -> list[dict]:
    return ds.take_all()


def global_context() -> tuple:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    return ctx.execution_options.preserve_order, ctx.max_errored_blocks, ctx.execution_no_progress_timeout_s


def test_read_images_over_a_folder(tiny_model: Path, sample_images, tmp_path: Path) -> None:
    import ray

    for name, data in list(sample_images.items())[:5]:
        Image.open(io.BytesIO(data)).save(tmp_path / f"{name}.png")
    before = global_context()
    caption = build_caption_processor(CaptionProcessorConfig(model=str(tiny_model), concurrency=(1, 2), **FAST))
    rows = rows_of(caption(ray.data.read_images(str(tmp_path), include_paths=True, mode="RGB")))
    assert global_context() == before
    assert len(rows) == 5 and {Path(r["path"]).stem for r in rows} == set(list(sample_images)[:5])
    assert set(rows[0]) == {"path"} | OUT  # the decoded image column is dropped by default
    assert all(r["error"] is None and isinstance(r["caption"], str) and 1 <= r["num_tokens"] <= 3 for r in rows)


def test_read_parquet_with_bytes_and_per_row_prompts(tiny_model: Path, tmp_path: Path) -> None:
    import ray

    prompts = ["Which colour? A: red B: blue", "Describe it.", None, "Which colour? A: red B: blue", "Count.", "   "]
    images = [png("red"), png("blue"), png("green"), b"not an image", png("white", (300, 300)), png("black")]
    pq.write_table(pa.table({"id": list(range(6)), "question": prompts, "image": pa.array(images, pa.binary())}),
                   tmp_path / "in.parquet")
    config = CaptionProcessorConfig(model=str(tiny_model), prompt_column="question", **FAST)
    rows = sorted(rows_of(build_caption_processor(config)(ray.data.read_parquet(str(tmp_path / "in.parquet")))),
                  key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(6)) and set(rows[0]) == {"id", "question"} | OUT
    captioned = [r["id"] for r in rows if r["error"] is None]
    assert captioned == [0, 1, 4]
    assert all(isinstance(rows[i]["caption"], str) and rows[i]["num_tokens"] >= 1 for i in captioned)
    assert "is null" in rows[2]["error"] and "not a recognized image" in rows[3]["error"]
    assert "is empty" in rows[5]["error"] and rows[5]["caption"] is None


def test_read_parquet_with_paths_keeping_the_image_column(tiny_model: Path, tmp_path: Path) -> None:
    import ray

    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(png((60 * i, 0, 0)))
    paths = ["imgs/0.png", str(tmp_path / "imgs" / "1.png"), "imgs/2.png", "imgs/missing.png"]
    pq.write_table(pa.table({"key": ["a", "b", "c", "d"], "image": paths}), tmp_path / "paths.parquet")
    config = CaptionProcessorConfig(model=str(tiny_model), image_root=str(tmp_path), keep_image_column=True, **FAST)
    rows = sorted(rows_of(build_caption_processor(config)(ray.data.read_parquet(str(tmp_path / "paths.parquet")))),
                  key=lambda r: r["key"])
    assert [r["image"] for r in rows] == paths and set(rows[0]) == {"key", "image"} | OUT
    assert [r["error"] is None for r in rows] == [True, True, True, False] and "not found" in rows[3]["error"]


def test_configs_that_cannot_work_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as err:
        build_caption_processor({"model": str(tmp_path / "nowhere")})
    assert err.value.field == "model" and "does not exist" in str(err.value)
    for fields, field in (({"concurrency": [2, 1]}, "concurrency"), ({"batchsize": 4}, "batchsize"),
                          ({"quantize": 3}, "quantize"), ({"prompt_column": "image"}, "(spec)")):
        with pytest.raises(SpecError) as err:
            build_caption_processor({"model": "org/name", **fields})
        assert err.value.field == field, fields
