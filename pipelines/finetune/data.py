"""Training rows → encoded rows: what one training row becomes, and why a row is dropped.

A row has an image cell (bytes, an absolute path or an s3:// URI; null for text-only
rows) and either a `conversations` list or a `caption` string. Bad rows are dropped and counted, never fatal:
an image that does not decode, a conversation that does not parse, or a sequence over the
length limit under the "drop" policy (or one that cannot be truncated without cutting the
image, under "truncate").
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..storage.images import DEFAULT_MAX_PIXELS, load_image
from ..prepare import InvalidRecord, normalize_conversations
from ..storage import Storage


@dataclass
class RowFormat:
    image_column: str = "image"
    conversations_column: str = "conversations"
    caption_column: str = "caption"
    prompt: str = "Describe the image."
    max_length: int = 2048
    length_policy: str = "truncate"  # or "drop"
    max_image_pixels: int = DEFAULT_MAX_PIXELS


COUNTER_NAMES = ("rows_used", "truncated", "dropped_bad_image", "dropped_bad_text", "dropped_too_long")


@dataclass
class DataCounters:
    """What happened to the training rows a worker read. Every worker holds every name, so
    summing them across workers is one fixed-size collective."""

    counts: Counter = field(default_factory=lambda: Counter({name: 0 for name in COUNTER_NAMES}))

    def add(self, key: str, n: int = 1) -> None:
        if key not in COUNTER_NAMES:
            raise KeyError(f"unknown data counter {key!r}")
        self.counts[key] += n

    def values(self) -> list[float]:
        return [float(self.counts[name]) for name in COUNTER_NAMES]


def row_turns(row: dict[str, Any], fmt: RowFormat, has_image: bool) -> list[dict[str, str]]:
    conversations = row.get(fmt.conversations_column)
    if conversations is not None and len(conversations):
        return normalize_conversations(conversations, has_image=has_image)
    caption = row.get(fmt.caption_column)
    if isinstance(caption, str) and caption.strip():
        return [{"role": "user", "content": fmt.prompt}, {"role": "assistant", "content": caption.strip()}]
    raise InvalidRecord(f"neither {fmt.conversations_column!r} nor {fmt.caption_column!r} holds text")


def encode_row(row: dict[str, Any], processor: Any, fmt: RowFormat, counters: DataCounters,
               storage: Storage | None = None):
    """One row → (encoding, uint8 pixels (tiles, 3, S, S) or None), or None when dropped."""
    cell = row.get(fmt.image_column)
    pixels = None
    if cell is not None:
        image, error = load_image(cell, max_pixels=fmt.max_image_pixels, storage=storage)
        if image is None:
            counters.add("dropped_bad_image")
            return None
        # uint8 (tiles, 3, S, S): a quarter of float32's bytes to move; normalised on the device.
        pixels = processor.prepare_image(image)
    has_image = pixels is not None
    try:
        turns = row_turns(row, fmt, has_image=has_image)
        tiles = pixels.shape[0] if has_image else 1  # each tile is a run of image tokens
        if fmt.length_policy == "truncate":
            encoding = processor.encode_conversation(turns, has_image=has_image, max_length=fmt.max_length, image_tiles=tiles)
        else:
            encoding = processor.encode_conversation(turns, has_image=has_image, image_tiles=tiles)
            if encoding is not None and len(encoding["input_ids"]) > fmt.max_length:
                encoding = None
    except ValueError:  # InvalidRecord included: unparsable turns, misplaced <image>
        counters.add("dropped_bad_text")
        return None
    if encoding is None:
        counters.add("dropped_too_long")
        return None
    if encoding["truncated"]:
        counters.add("truncated")
    counters.add("rows_used")
    return encoding, pixels
