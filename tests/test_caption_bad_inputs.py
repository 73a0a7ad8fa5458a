"""Every kind of bad cell through the whole caption job: each row ends as a caption or a
clear error, rows out = rows in. And retry_errors re-captions only the rows that failed."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.caption import run_caption
from pipelines.specs import CaptionSpec, build_spec

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

FAST = {"batch_size": 4, "dtype": "float32", "generation": {"max_new_tokens": 4}, "id_columns": ["id"]}


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header claiming a huge size with almost no data: a decompression bomb for free."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def dds_header() -> bytes:
    """A DDS header with a pixel format Pillow does not implement (it raises NotImplementedError)."""
    return (b"DDS " + struct.pack("<7I", 124, 0x1007, 64, 64, 0, 0, 0) + b"\0" * 44
            + struct.pack("<2I", 32, 4) + b"XYZW" + b"\0" * 40)


def byte_cells() -> dict[str, tuple[bytes | None, str | None]]:
    """name → (cell, None if it must be captioned, else a fragment of its error)."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    jpeg = encode(noise, "JPEG")
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6
    return {
        "good": (jpeg, None),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "could not be decoded"),
        "zero_bytes": (b"", "empty image bytes"),
        "text": (b"just some text, certainly not pixels\n" * 3, "not a recognized image format"),
        "dds_header": (dds_header(), "NotImplementedError"),
        "bomb_20000x20000": (png_claiming(20000, 20000), "over the limit"),
        "cmyk_jpeg": (encode(Image.new("CMYK", (24, 16), (0, 255, 255, 0)), "JPEG"), None),
        "png_16bit": (encode(Image.fromarray(np.full((12, 20), 40000, np.uint16)), "PNG"), None),
        "palette_transparency": (encode(palette, "PNG", transparency=0), None),
        "animated_gif": (gif.getvalue(), None),
        "exif_rotated_jpeg": (encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif.tobytes()), None),
        "null": (None, "image is null"),
    }


def test_bad_input_corpus(tiny_model: Path, tmp_path: Path) -> None:
    cells = byte_cells()
    (tmp_path / "in" / "imgs").mkdir(parents=True)
    (tmp_path / "in" / "imgs" / "ok.png").write_bytes(encode(Image.new("RGB", (9, 9), "green"), "PNG"))
    pq.write_table(pa.table({"id": list(cells), "image": pa.array([c for c, _ in cells.values()], pa.binary())}),
                   tmp_path / "in" / "bytes.parquet")
    paths = {"relative_ok": ("imgs/ok.png", None), "missing_file": ("imgs/missing.png", "not found"),
             "http_scheme": ("http://example.com/a.png", "not supported"), "null_path": (None, "image is null"),
             "directory": ("imgs", "Is a directory")}
    pq.write_table(pa.table({"id": list(paths), "image": pa.array([c for c, _ in paths.values()], pa.string())}),
                   tmp_path / "in" / "paths.parquet")

    summary = run_caption(build_spec(CaptionSpec, {**FAST, "input": str(tmp_path / "in"),
                                                   "output": str(tmp_path / "out"), "model": str(tiny_model)}))
    assert summary["status"] == "complete" and summary["shards_committed"] == 2
    expected = {**cells, **paths}
    rows = [r for name in ("bytes", "paths") for r in pq.read_table(tmp_path / "out" / f"{name}.parquet").to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(expected)  # rows out = rows in, each once
    for row in rows:
        must_fail = expected[row["id"]][1]
        if must_fail is None:
            assert row["error"] is None and isinstance(row["caption"], str) and row["num_tokens"] >= 1, row
        else:
            assert row["caption"] is None and must_fail in row["error"], row
            assert "Traceback" not in row["error"] and "\n" not in row["error"]
    assert summary["errors"] == sum(1 for _, why in expected.values() if why)


def test_retry_errors_recaptions_only_the_failed_rows(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "in" / "imgs").mkdir(parents=True)
    names = [f"img{i}.png" for i in range(6)]
    for i, name in enumerate(names):
        if i % 2 == 0:  # the odd ones are missing in the first run
            (tmp_path / "in" / "imgs" / name).write_bytes(encode(Image.new("RGB", (10, 10), (40 * i, 0, 0)), "PNG"))
    pq.write_table(pa.table({"id": names, "image": [f"imgs/{n}" for n in names]}), tmp_path / "in" / "p.parquet")
    spec = {**FAST, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": str(tiny_model)}
    first = run_caption(build_spec(CaptionSpec, spec))
    assert first["errors"] == 3
    before = pq.read_table(tmp_path / "out" / "p.parquet").to_pylist()
    for i, name in enumerate(names):
        if i % 2:
            (tmp_path / "in" / "imgs" / name).write_bytes(encode(Image.new("RGB", (10, 10), "blue"), "PNG"))

    assert run_caption(build_spec(CaptionSpec, spec))["shards_skipped"] == 1  # errors alone are not redone
    again = run_caption(build_spec(CaptionSpec, {**spec, "retry_errors": True}))
    assert (again["rows_in"], again["rows_out"], again["errors"]) == (3, 3, 0)
    after = pq.read_table(tmp_path / "out" / "p.parquet").to_pylist()
    assert [r["id"] for r in after] == names and all(r["error"] is None for r in after)
    for i in range(0, 6, 2):  # rows that were fine keep their committed caption
        assert after[i] == before[i]
    assert run_caption(build_spec(CaptionSpec, {**spec, "retry_errors": True}))["shards_skipped"] == 1
