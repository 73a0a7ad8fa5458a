"""Decode one image cell (encoded bytes, or a path/URI string) into a PIL image.

Every failure of the cell itself is returned as a short message, never raised: a bad row
must become a row with an `error`, not a failed task. Only a transient storage error (the
store is down or throttling) is raised, since retrying later can fix it.
The pixel-count limit is checked on the header, before any pixel is decoded, so a small file that claims a huge size costs nothing.
"""

from __future__ import annotations

import io
import posixpath
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from .store import Location, Storage, StorageError, TransientStorageError, parse_uri

# The one pixel limit (the spec's max_image_pixels defaults to it). 50 megapixels: above
# common camera output, far below what would exhaust a worker when a batch of such images
# is decoded at once (50 MP RGB is 150 MB).
DEFAULT_MAX_PIXELS = 50_000_000

ImageResult = tuple["Image.Image | None", "str | None"]


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> ImageResult:
    """Encoded bytes → (decoded image, None) or (None, why not).

    The image keeps its own mode (CMYK, I;16, P with transparency, ...): the model's
    processor owns the one conversion to RGB, so training and captioning see the same
    pixels. Animated images give their first frame; EXIF orientation is applied.
    """
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
                img.draft(img.mode, (draft_size, draft_size))
            img.load()
            # EXIF orientation: phone photos lie sideways. Parsing EXIF costs more than
            # decoding a small image, so only images that carry EXIF are asked.
            if "exif" in img.info and img.getexif().get(0x0112, 1) != 1:
                img = ImageOps.exif_transpose(img)
            return img, None
    except Image.DecompressionBombError as exc:
        # PIL refuses sizes over twice its own global limit even before our check runs.
        return None, f"image is over the limit of pixels PIL will open ({exc})"
    except UnidentifiedImageError:
        return None, "not a recognized image format (corrupt or unsupported bytes)"
    except Exception as exc:  # noqa: BLE001 - any decoder failure (OSError, NotImplementedError, ...) is this row's
        return None, f"image could not be decoded: {describe_exception(exc)}"


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """`Type: first line of the message`, short enough for an error column; no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text[:limit]}" if text else type(exc).__name__


def load_image(
    value: object,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    storage: Storage | None = None,
    base: Location | None = None,
    draft_size: int | None = None,
) -> ImageResult:
    """A cell of the image column → (image, None) or (None, why not).

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
    except TransientStorageError:
        raise  # the store, not this row, is the problem: the caller retries or fails the shard
    except StorageError as exc:
        return None, f"image path {value!r}: {_tail(str(exc))}"
    return decode_image(data, max_pixels=max_pixels, draft_size=draft_size)


def _tail(msg: str) -> str:
    """StorageError messages start with "reading <uri>: "; the path is already named."""
    return msg.split(": ", 1)[1] if msg.startswith("reading ") and ": " in msg else msg
