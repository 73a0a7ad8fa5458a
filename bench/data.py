"""Benchmark inputs built offline: Parquet shards of distinct synthetic photos, and the
helpers a bare (Ray-free) loop uses to read them the way the jobs' inputs are defined."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def synthetic_image(index: int, rng: np.random.Generator) -> bytes:
    """A smooth colour field with noise, its size and format varying by index, so decoding
    and resizing cost what they would on mixed real photos."""
    height, width = 48 + (index * 37) % 160, 48 + (index * 53) % 160
    y, x = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 2 * np.pi, size=3)
    channels = [127 + 100 * np.sin(x / (9 + c * 4) + y / (13 + c * 3) + phase[c]) for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if index % 3 == 0 else "JPEG", quality=90)
    return buffer.getvalue()


def write_image_shards(folder: Path, images: int, shards: int, seed: int = 0) -> list[Path]:
    """`images` rows (columns id, image) spread evenly over `shards` Parquet files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schema = pa.schema([("id", pa.string()), ("image", pa.binary())])
    paths, index = [], 0
    for k in range(shards):
        count = images // shards + (1 if k < images % shards else 0)
        rows = [{"id": f"img-{index + i:05d}", "image": synthetic_image(index + i, rng)} for i in range(count)]
        index += count
        path = folder / f"part-{k:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        paths.append(path)
    return paths


def read_rows(folder: Path, columns: list[str] | None = None) -> list[dict]:
    """Every row of every shard in the folder, in shard order."""
    rows: list[dict] = []
    for path in sorted(folder.glob("*.parquet")):
        rows.extend(pq.read_table(path, columns=columns).to_pylist())
    return rows


def decode(image_bytes: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    return image
