"""LLaVA-style conversations (JSON array or JSON lines) + an image folder → Parquet shards
with the images embedded, so the shards are self-contained on object storage."""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from .output import (
    DEFAULT_LLAVA_SHARD_ROWS,
    DEFAULT_MAX_SHARD_BYTES,
    LLAVA_SCHEMA,
    InvalidRecord,
    PrepareError,
    PrepareSummary,
    ShardSink,
    SkippedRecord,
    check_shard_rows,
    finish_output,
    normalize_conversations,
    prepare_output,
)

log = logging.getLogger(__name__)

# How many LLaVA records are read and verified together; bounds memory to a few hundred images.
_LOAD_CHUNK = 256


# --- LLaVA-style JSON ----------------------------------------------------------------------


def iter_json_records(json_path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (where, record-or-InvalidRecord). A JSON array is loaded whole (it cannot be
    parsed partially); anything else is read as JSON lines, one bad line never stopping
    the rest. The format is sniffed from the content, as many .json files are JSON lines."""
    try:
        handle = open(json_path, encoding="utf-8-sig")
    except OSError as exc:
        raise PrepareError(
            f"--json {str(json_path)!r} cannot be opened ({exc.strerror}); "
            "pass an existing .json or .jsonl file"
        ) from exc
    with handle:
        head = handle.read(4096).lstrip()
        handle.seek(0)
        if not head:
            raise PrepareError(f"--json {str(json_path)!r} is empty; pass a file with LLaVA-style records")
        if head.startswith("["):
            try:
                records = json.load(handle)
            except json.JSONDecodeError as exc:
                raise PrepareError(
                    f"--json {str(json_path)!r} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                    f"column {exc.colno}); fix the file or convert it to JSON lines"
                ) from exc
            for i, record in enumerate(records, 1):
                yield f"record {i}", record
            return
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                yield f"line {lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                yield f"line {lineno}", InvalidRecord(f"not valid JSON ({exc.msg} at column {exc.colno})")


def _parse_llava_record(record: Any) -> tuple[str, str | None, list[dict[str, str]]]:
    if not isinstance(record, dict):
        raise InvalidRecord(f"record is a {type(record).__name__}, not an object")
    rid = record.get("id")
    # Ids are required: inventing them would make two runs over edited files disagree.
    if rid is None or (isinstance(rid, str) and not rid.strip()) or isinstance(rid, (dict, list)):
        raise InvalidRecord("record has no usable 'id'")
    image = record.get("image")
    if isinstance(image, list):
        if len(image) != 1:
            raise InvalidRecord(f"record names {len(image)} images; only one image per record is supported")
        image = image[0]
    if image is not None and not isinstance(image, str):
        raise InvalidRecord("'image' must be a relative path string")
    image = image or None  # "" means text-only, as in some LLaVA exports
    turns = normalize_conversations(record.get("conversations"), has_image=image is not None)
    return str(rid), image, turns


def check_image_bytes(data: bytes) -> None:
    """Decode the image once so a corrupt file is reported now, not mid-training."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            # JPEG can decode at 1/8 scale: the whole stream is still read (truncation is
            # caught) at a fraction of the cost.
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()


def load_image_file(root: Path, rel: str) -> tuple[bytes | None, str | None]:
    """(original encoded bytes, None) or (None, reason). Never raises for a bad file."""
    if os.path.isabs(rel):
        return None, "absolute path; 'image' must be relative to --images"
    # Checked on the spelled path, not the resolved one: image folders are often symlinks
    # into shared storage, which is fine; "../" climbing out of the folder is not.
    path = Path(os.path.normpath(root / rel))
    if not path.is_relative_to(root):
        return None, "path leaves the --images folder"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "file not found"
    except IsADirectoryError:
        return None, "is a folder, not an image file"
    except OSError as exc:
        return None, f"cannot read ({exc.strerror or exc})"
    if not data:
        return None, "empty file"
    try:
        check_image_bytes(data)
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, bomb errors, ...)
        return None, f"cannot decode ({type(exc).__name__}: {exc})"
    return data, None


def prepare_llava(
    json_path: str | os.PathLike[str],
    images: str | os.PathLike[str] | None,
    output: str,
    *,
    shard_rows: int = DEFAULT_LLAVA_SHARD_ROWS,
    overwrite: bool = False,
    workers: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> PrepareSummary:
    """LLaVA-style JSON/JSONL + image folder -> OUTPUT/part-NNNNN.parquet (+ _SUMMARY.json).

    Records keep their input order. Rows whose image is missing or cannot be decoded are
    skipped and listed in `missing_images`; malformed records go to `invalid_records`.
    Raises PrepareError for unusable arguments, or when no row at all could be written.
    """
    started = time.perf_counter()
    check_shard_rows(shard_rows)
    json_file = Path(json_path).expanduser()
    if not json_file.is_file():
        raise PrepareError(f"--json {str(json_path)!r} is not a file; pass a LLaVA-style .json or .jsonl file")
    root: Path | None = None
    if images is not None:
        root = Path(os.path.abspath(Path(images).expanduser()))
        if not root.is_dir():
            raise PrepareError(
                f"--images {str(images)!r} is not a folder; pass the folder that the records' "
                "'image' paths are relative to"
            )
    workers = workers or min(8, os.cpu_count() or 1)
    out = prepare_output(output, overwrite)
    sink = ShardSink(out, "", LLAVA_SCHEMA, shard_rows, max_shard_bytes)
    summary = PrepareSummary(
        dataset="llava",
        output=output,
        options={"json": str(json_path), "images": None if images is None else str(images), "shard_rows": shard_rows},
    )

    def write_chunk(chunk: list[tuple[str, str, str | None, list[dict[str, str]]]], pool: ThreadPoolExecutor) -> None:
        # Reading and decoding run in threads (file I/O and PIL release the GIL); results
        # come back in input order, so rows stay in the order of the JSON file.
        loaded = pool.map(lambda c: load_image_file(root, c[2]) if c[2] and root else (None, None), chunk)
        for (where, rid, rel, turns), (data, problem) in zip(chunk, loaded):
            if rel is not None and root is None:
                problem = "record names an image but no --images folder was given"
            if problem is not None:
                summary.missing_images.append(SkippedRecord(where, rid, problem, rel))
                continue
            if data is None:
                summary.text_only_rows += 1
            row = {"id": rid, "image": data, "caption": None, "conversations": turns}
            sink.add(row, len(data) if data else 0)

    chunk: list[tuple[str, str, str | None, list[dict[str, str]]]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for where, record in iter_json_records(json_file):
            summary.records_read += 1
            try:
                if isinstance(record, InvalidRecord):
                    raise record
                rid, rel, turns = _parse_llava_record(record)
            except InvalidRecord as exc:
                guess = record.get("id") if isinstance(record, dict) else None
                summary.invalid_records.append(SkippedRecord(where, None if guess is None else str(guess), str(exc)))
                continue
            chunk.append((where, rid, rel, turns))
            if len(chunk) >= _LOAD_CHUNK:
                write_chunk(chunk, pool)
                chunk = []
        write_chunk(chunk, pool)
    return finish_output(out, sink, summary, f"--json {str(json_path)!r}", started,
                         ". Check that --images is the folder the 'image' paths are relative to")
