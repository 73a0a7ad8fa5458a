"""pipelines.storage.images: every kind of cell becomes a decoded image or an error string, never an
exception. The conversion to RGB is the model processor's (trol.processing.to_rgb, the one
conversion shared with training); these tests run decoded images through it."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.storage.images import decode_image, load_image
from trol.processing import to_rgb
from pipelines.storage import Location, Storage, parse_uri


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR that claim a huge size, with almost no pixel data:
    the shape of a decompression bomb, costing nothing unless someone decodes it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_color_and_gray_sample_images_decode(sample_images: dict[str, bytes]) -> None:
    for name, data in sample_images.items():
        img, err = decode_image(data)
        assert err is None, name
        assert img.mode in ("RGB", "L") and min(img.size) > 0


@pytest.mark.parametrize(
    ("mode", "color", "fmt"),
    [("L", 128, "PNG"), ("CMYK", (0, 255, 255, 0), "JPEG"), ("1", 1, "PNG"), ("I;16", 1000, "PNG"), ("P", 3, "GIF")],
)
def test_modes_become_rgb(mode: str, color, fmt: str) -> None:
    img, err = decode_image(encode(Image.new(mode, (9, 7), color), fmt))
    assert err is None and img.size == (9, 7)
    assert to_rgb(img).mode == "RGB"


def test_cmyk_keeps_its_color() -> None:
    img, _ = decode_image(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"))  # pure red in CMYK
    r, g, b = to_rgb(img).getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_transparency_is_flattened_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    img, err = decode_image(encode(rgba, "PNG"))
    img = to_rgb(img)
    assert err is None and img.getpixel((3, 3)) == (255, 255, 255) and img.getpixel((0, 0)) == (0, 0, 255)
    la, err = decode_image(encode(Image.new("LA", (2, 2), (0, 0)), "PNG"))
    assert err is None and to_rgb(la).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_gray_is_scaled_not_clipped() -> None:
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img, err = decode_image(encode(Image.fromarray(arr), "PNG"))
    img = to_rgb(img)
    assert [img.getpixel((x, 0))[0] for x in range(3)] == [0, 127, 255]


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, display rotated 90 degrees
    img, err = decode_image(encode(Image.new("RGB", (40, 20), "white"), "JPEG", exif=exif.tobytes()))
    assert err is None and img.size == (20, 40)


def test_jpeg_draft_decodes_large_images_smaller() -> None:
    data = encode(Image.new("RGB", (800, 600), "green"), "JPEG")
    img, err = decode_image(data, draft_size=64)
    assert err is None and 64 <= min(img.size) and img.size[0] < 800


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (b"", "empty image bytes"),
        (b"definitely not an image", "not a recognized image format"),
        (None, "image is null"),
        (42, "expected bytes or a path string"),
        ("", "image path is empty"),
        ("http://example.com/a.png", "not supported"),
    ],
)
def test_bad_cells_are_errors(cell, message: str) -> None:
    img, err = load_image(cell)
    assert img is None and message in err


def test_truncated_png_is_an_error() -> None:
    data = encode(Image.new("RGB", (64, 64), "red").effect_spread(3), "PNG")
    img, err = decode_image(data[: len(data) // 2])
    assert img is None and "decoded" in err


def test_pixel_limit_is_checked_before_decoding() -> None:
    start = time.perf_counter()
    img, err = decode_image(png_header_only(100_000, 100_000))  # 10 gigapixels claimed
    assert img is None and "over the limit" in err
    img, err = decode_image(png_header_only(10_000, 10_000))  # 100 MP: over ours, under PIL's
    assert img is None and "over the limit of 50000000" in err and "max_image_pixels" in err
    assert time.perf_counter() - start < 1.0
    img, err = decode_image(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5_000)
    assert img is None and "100x100" in err


def test_paths_local_relative_and_missing(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(encode(Image.new("RGB", (5, 5), "blue"), "PNG"))
    img, err = load_image(str(tmp_path / "imgs" / "a.png"))
    assert err is None and img.size == (5, 5)
    img, err = load_image("imgs/a.png", base=Location("file", str(tmp_path)))
    assert err is None
    img, err = load_image(f"file://{tmp_path}/imgs/a.png")
    assert err is None
    img, err = load_image("imgs/missing.png", base=Location("file", str(tmp_path)))
    assert img is None and "not found" in err and "missing.png" in err


def test_s3_path(s3_env, make_bucket) -> None:
    bucket = make_bucket()
    st = Storage.from_environment(s3_env.endpoint_url)
    st.write_bytes(parse_uri(f"s3://{bucket}/imgs/x.jpg"), encode(Image.new("RGB", (6, 4)), "JPEG"))
    img, err = load_image(f"s3://{bucket}/imgs/x.jpg", storage=st)
    assert err is None and img.size == (6, 4)
    img, err = load_image("x.jpg", storage=st, base=parse_uri(f"s3://{bucket}/imgs"))
    assert err is None
    img, err = load_image(f"s3://{bucket}/imgs/none.jpg", storage=st)
    assert img is None and "not found" in err
