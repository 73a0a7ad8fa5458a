"""Decode one image cell (encoded bytes, or a path/URI string) into an RGB PIL image.

Every failure is returned as a short message, never raised: a bad row must become a row
with an `error`, not a failed task. The pixel-count limit is checked on the header,
before any pixel is decoded, so a small file that claims a huge size costs nothing.
"""

from __future__ import annotations

import io
import posixpath
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .storage import Location, StorageError, Storage, parse_uri

# 50 megapixels: above common camera output, far below what would exhaust a worker when a
# batch of such images is decoded at once (50 MP RGB is 150 MB).
DEFAULT_MAX_PIXELS = 50_000_000

ImageResult = tuple["Image.Image | None", "str | None"]


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> ImageResult:
    """Encoded bytes → (RGB image, None) or (None, why not)."""
    if not data:
        return None, "empty image bytes"
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's global one (a warning, then an error at 2x).
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width <= 0 or height <= 0:
                return None, f"image has an invalid size {width}x{height}"
            if width * height > max_pixels:
                return None, (
                    f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
                    "(raise max_image_pixels in the spec to allow it)"
                )
            if draft_size and img.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale directly; the result stays at least
                # draft_size on each side, and the processor resizes it anyway.
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: phone photos lie sideways
                img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        # PIL refuses sizes over twice its own global limit even before our check runs.
        return None, f"image is over the limit of pixels PIL will open ({exc})"
    except UnidentifiedImageError:
        return None, "not a recognized image format (corrupt or unsupported bytes)"
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        return None, f"image could not be decoded: {exc}"
    try:
        return to_rgb(img), None
    except (OSError, ValueError) as exc:
        return None, f"image mode {img.mode} could not be converted to RGB: {exc}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode → RGB. Transparency is flattened onto white (what a viewer shows)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode.startswith("I") or mode == "F":
        # 16/32-bit grayscale: PIL's convert() clips at 255, which turns most 16-bit
        # images white; scale into 8 bits instead.
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif top > 255.0:
            arr = arr / (65535.0 / 255.0) if top <= 65535.0 else arr * (255.0 / top)
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")


def load_image(
    value: object,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage: Storage | None = None,
    base: Location | None = None,
    draft_size: int | None = None,
) -> ImageResult:
    """A cell of the image column → (RGB image, None) or (None, why not).

    Strings are paths or URIs; a relative path is taken relative to `base` (the folder of
    the shard that holds the row), so a dataset and its images can move together.
    """
    if value is None:
        return None, "image is null"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_image(bytes(value), max_pixels=max_pixels, draft_size=draft_size)
    if not isinstance(value, str):
        return None, f"image cell has type {type(value).__name__}; expected bytes or a path string"
    if not value.strip():
        return None, "image path is empty"
    try:
        if "://" not in value and not value.startswith("/") and base is not None:
            loc = Location(base.scheme, posixpath.normpath(posixpath.join(base.path, value)))
        else:
            loc = parse_uri(value)
        data = (storage or Storage()).read_bytes(loc)
    except StorageError as exc:
        return None, f"image path {value!r}: {_tail(str(exc))}"
    return decode_image(data, max_pixels=max_pixels, draft_size=draft_size)


def _tail(msg: str) -> str:
    """StorageError messages start with "reading <uri>: "; the path is already named."""
    return msg.split(": ", 1)[1] if msg.startswith("reading ") and ": " in msg else msg
