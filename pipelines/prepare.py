"""Turn training data into the Parquet shards the fine-tuning job reads (issue 4).

Two sources are supported:

- LLaVA-style conversations (a JSON array or JSON lines) plus a folder of images. Each
  record becomes one row; the image file's original encoded bytes are embedded so that
  the shards are self-contained on object storage.
- scikit-learn's bundled 8x8 handwritten digits (no download), split into ``train/`` and
  ``test/`` with captions such as "a handwritten digit seven". This is the data of the
  end-to-end "it really learns" test.

Shard layout and schema (both sources)::

    OUTPUT/[split/]part-00000.parquet, part-00001.parquet, ...   and   OUTPUT/_SUMMARY.json
    id: string, image: binary (null for text-only rows), caption: string,
    conversations: list<struct<role: string, content: string>> with role "user"|"assistant"
    (+ label: int64 for digits)

Each shard is serialised in memory and written with a single call through
pipelines.storage: locally to a temporary name that is then renamed, on S3 as one PUT
(S3 has no rename, but an object only becomes visible once its PUT completes).
``_SUMMARY.json`` is written last, so its presence means every shard listed in it is
complete.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.storage import Location, Storage, StorageError, describe_error, parse_uri

log = logging.getLogger(__name__)

# --- Defaults, in one place -------------------------------------------------------------

IMAGE_TOKEN = "<image>"
DIGIT_PROMPT = f"{IMAGE_TOKEN}\nDescribe the image."
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# LLaVA rows carry full-size images (~100-300 KB each): 1000 rows keeps a shard in the
# 100-300 MB range that object stores and Ray read tasks handle well.
DEFAULT_LLAVA_SHARD_ROWS = 1000
# Digits are tiny; 512 rows still gives several train shards so Ray has parallel reads.
DEFAULT_DIGITS_SHARD_ROWS = 512
DEFAULT_IMAGE_SIZE = 64
DEFAULT_TEST_FRACTION = 0.2
# A Parquet `binary` column holds at most 2 GiB per chunk, and one huge PUT is slow to
# retry; a shard is closed early when its image bytes would pass this.
DEFAULT_MAX_SHARD_BYTES = 1 << 30
# Small row groups let readers stream a shard of large images without holding all of it.
ROW_GROUP_ROWS = 128
SUMMARY_NAME = "_SUMMARY.json"
# Files this module writes, relative to --output; the only ones --overwrite deletes.
_OWN_FILE = re.compile(r"(?:(?:train|test)/)?part-\d{5,}\.parquet|_SUMMARY\.json")
Resample = Literal["nearest", "bilinear"]
_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
# How many LLaVA records are read and verified together; bounds memory to a few hundred images.
_LOAD_CHUNK = 256

CONVERSATIONS_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
LLAVA_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("caption", pa.string()),
        ("conversations", CONVERSATIONS_TYPE),
    ]
)
DIGITS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("label", pa.int64()),
        ("caption", pa.string()),
        ("conversations", CONVERSATIONS_TYPE),
    ]
)

# "from"/"role" spellings seen in LLaVA, ShareGPT and OpenAI-style data.
_ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}


class PrepareError(ValueError):
    """A problem with the arguments or the input as a whole; the message names the fix."""


class InvalidRecord(ValueError):
    """One record cannot become a training row; it is skipped and listed, never fatal."""


# --- Results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the output root, e.g. "train/part-00000.parquet"
    rows: int
    bytes: int


@dataclass(frozen=True)
class SkippedRecord:
    where: str  # "line 12" (JSON lines) or "record 12" (JSON array), 1-based
    id: str | None
    reason: str
    image: str | None = None


@dataclass
class PrepareSummary:
    dataset: str
    output: str
    shards: list[ShardInfo] = field(default_factory=list)
    records_read: int = 0
    text_only_rows: int = 0
    missing_images: list[SkippedRecord] = field(default_factory=list)
    invalid_records: list[SkippedRecord] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def rows_written(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def splits(self) -> dict[str, int]:
        """Rows per split folder ("" when the shards sit at the output root)."""
        out: dict[str, int] = {}
        for shard in self.shards:
            split = posixpath.dirname(shard.path)
            out[split] = out.get(split, 0) + shard.rows
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rows_written"] = self.rows_written
        data["splits"] = self.splits
        return data

    def format(self, max_listed: int = 20) -> str:
        """Human-readable report; long problem lists are cut (the JSON summary has them all)."""
        lines = [
            f"prepared {self.dataset}: {self.rows_written} rows in {len(self.shards)} "
            f"shard{'s' if len(self.shards) != 1 else ''} "
            f"-> {self.output} ({self.seconds:.1f} s)"
        ]
        if len(self.splits) > 1 or "" not in self.splits:
            for split, rows in sorted(self.splits.items()):
                n = sum(1 for s in self.shards if posixpath.dirname(s.path) == split)
                lines.append(f"  {split or '.'}: {rows} rows, {n} shard{'s' if n != 1 else ''}")
        if self.dataset == "llava":
            lines.append(f"  records read: {self.records_read}")
            lines.append(f"  text-only rows: {self.text_only_rows}")
        for title, items in (
            ("missing or unreadable images (rows skipped)", self.missing_images),
            ("invalid records (skipped)", self.invalid_records),
        ):
            if self.dataset == "digits" and not items:
                continue
            lines.append(f"  {title}: {len(items)}")
            for item in items[:max_listed]:
                image = f" image={item.image!r}" if item.image is not None else ""
                lines.append(f"    {item.where} id={item.id!r}{image}: {item.reason}")
            if len(items) > max_listed:
                lines.append(f"    ... and {len(items) - max_listed} more (see {SUMMARY_NAME})")
        return "\n".join(lines)


# --- Output -------------------------------------------------------------------------------


def _open_output(uri: str) -> tuple[Storage, Location]:
    """Resolve --output (local folder, file:// or s3://bucket/prefix) through pipelines.storage.

    S3 endpoint, region and credentials come from the standard AWS variables/profile, as for
    every other job; local output needs no AWS set-up at all.
    """
    try:
        loc = parse_uri(uri)
        storage = Storage.from_environment() if loc.scheme == "s3" else Storage()
    except StorageError as exc:
        raise PrepareError(f"--output: {exc}") from None
    return storage, loc


@dataclass
class _Output:
    storage: Storage
    root: Location
    uri: str

    def write_bytes(self, rel: str, data: bytes) -> None:
        # Storage.write_bytes is all-or-nothing: a same-folder temporary file renamed into
        # place locally (its name does not end in .parquet, so readers skip it), one PUT on S3.
        try:
            self.storage.write_bytes(self.root.join(rel), data)
        except StorageError as exc:
            raise PrepareError(f"--output: {exc}") from None


def _prepare_output(uri: str, overwrite: bool) -> _Output:
    """Open --output and make sure earlier shards cannot mix with this run's."""
    storage, root = _open_output(uri)
    if root.scheme == "file" and os.path.isfile(root.path):
        raise PrepareError(f"--output {uri!r} is a file; pass a folder (or s3:// prefix)")
    try:
        entries = storage.list_files(root)
    except StorageError as exc:
        raise PrepareError(f"--output: {exc}") from None
    def rel(e: Location) -> str:
        return posixpath.relpath(e.path, root.path)

    ours = [e for e in entries if _OWN_FILE.fullmatch(rel(e))]
    # --overwrite only ever deletes files of our own layout: pointed at a folder of other
    # Parquet data by mistake, the job refuses instead of deleting someone's dataset.
    foreign = [e for e in entries if e.path.endswith(".parquet") and not _OWN_FILE.fullmatch(rel(e))]
    if foreign:
        raise PrepareError(
            f"--output {uri!r} holds {len(foreign)} Parquet file(s) this job did not write "
            f"(e.g. {rel(foreign[0])}); choose an empty --output"
        )
    if ours and not overwrite:
        raise PrepareError(
            f"--output {uri!r} already holds {len(ours)} shard/summary file(s) from an earlier run "
            f"(e.g. {rel(ours[0])}); pass --overwrite to replace them, or choose an empty --output"
        )
    # The summary goes first: if deletion stops half-way, no stale "complete" marker remains.
    for entry in sorted(ours, key=lambda e: posixpath.basename(e.path) != SUMMARY_NAME):
        _delete(storage, entry)
    return _Output(storage, root, uri)


def _delete(storage: Storage, loc: Location) -> None:
    # Through the storage's own client: pyarrow's S3 delete_file would leave "folder/"
    # marker objects behind to keep the emptied prefix "existing".
    try:
        if loc.scheme == "file":
            os.remove(loc.path)
        else:
            bucket, _, key = loc.path.partition("/")
            storage.s3_client().delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # boto3/OS errors; describe_error words them without secrets
        raise PrepareError(f"--overwrite: {describe_error(exc, f'deleting {loc.uri}')}") from None


def _parquet_write_options(schema: pa.Schema) -> dict[str, Any]:
    """Per-column writer options: image bytes are already compressed (PNG/JPEG), so
    compressing, dictionary-encoding or keeping min/max statistics of them only costs time
    and space; everything else is zstd-compressed text."""
    # Option keys are Parquet leaf paths (e.g. "conversations.list.element.role"); derive
    # them from the writer itself instead of guessing its nested naming.
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink)
    parquet_schema = pq.ParquetFile(pa.BufferReader(sink.getvalue())).schema
    leaves = [parquet_schema.column(i).path for i in range(len(parquet_schema))]
    others = [p for p in leaves if p != "image"]
    return {
        "compression": {p: ("none" if p == "image" else "zstd") for p in leaves},
        "use_dictionary": others,
        "write_statistics": others,
        "row_group_size": ROW_GROUP_ROWS,
    }


class _ShardSink:
    """Collects rows and writes part-NNNNN.parquet files of `shard_rows` rows each."""

    def __init__(self, out: _Output, prefix: str, schema: pa.Schema, shard_rows: int, max_shard_bytes: int) -> None:
        self.out = out
        self.prefix = prefix
        self.schema = schema
        self.shard_rows = shard_rows
        self.max_shard_bytes = max_shard_bytes
        self.shards: list[ShardInfo] = []
        self._options = _parquet_write_options(schema)
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0

    def add(self, row: dict[str, Any], nbytes: int) -> None:
        if self._rows and self._bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._rows.append(row)
        self._bytes += nbytes
        if len(self._rows) >= self.shard_rows:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf, **self._options)
        data = buf.getvalue().to_pybytes()
        name = f"part-{len(self.shards):05d}.parquet"
        rel = posixpath.join(self.prefix, name) if self.prefix else name
        self.out.write_bytes(rel, data)
        self.shards.append(ShardInfo(rel, table.num_rows, len(data)))
        log.info("wrote %s (%d rows, %.1f MB)", rel, table.num_rows, len(data) / 1e6)
        self._rows = []
        self._bytes = 0


def _write_summary(out: _Output, summary: PrepareSummary) -> None:
    text = json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n"
    out.write_bytes(SUMMARY_NAME, text.encode("utf-8"))


def _check_shard_rows(shard_rows: int) -> None:
    if isinstance(shard_rows, bool) or not isinstance(shard_rows, int) or shard_rows < 1:
        raise PrepareError(f"--shard-rows must be a positive whole number (got {shard_rows!r})")


# --- Conversations --------------------------------------------------------------------------


def normalize_conversations(turns: Any, *, has_image: bool | None = None) -> list[dict[str, str]]:
    """LLaVA {"from","value"} or chat {"role","content"} turns -> [{"role","content"}].

    Roles become "user"/"assistant" (human/gpt are mapped). The first turn must be the
    user's and at least one assistant turn must exist, since training learns only from
    assistant tokens. With `has_image` True the conversation must hold at most one
    "<image>" and one is put in front of the first user turn when absent (LLaVA's own
    convention); with False it must hold none, since there would be no pixels to put
    there. Also accepts numpy arrays of dicts, as Ray Data hands list columns over.
    Raises InvalidRecord naming the problem.
    """
    if isinstance(turns, np.ndarray):
        turns = turns.tolist()
    if not isinstance(turns, (list, tuple)) or len(turns) == 0:
        raise InvalidRecord("'conversations' must be a non-empty list of turns")
    out: list[dict[str, str]] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise InvalidRecord(f"turn {i} is a {type(turn).__name__}, not an object")
        raw_role = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if not isinstance(raw_role, str):
            raise InvalidRecord(f"turn {i} has no 'from' or 'role' string")
        role = _ROLE_ALIASES.get(raw_role.strip().lower())
        if role is None:
            raise InvalidRecord(
                f"turn {i} has role {raw_role!r}; expected one of {sorted(_ROLE_ALIASES)}"
            )
        if not isinstance(content, str):
            raise InvalidRecord(f"turn {i} has no 'value' or 'content' string")
        out.append({"role": role, "content": content})
    if out[0]["role"] != "user":
        raise InvalidRecord("the first turn must come from the user (human)")
    if not any(t["role"] == "assistant" for t in out):
        raise InvalidRecord("no assistant (gpt) turn, so there is nothing to learn from")
    if has_image is not None:
        count = sum(t["content"].count(IMAGE_TOKEN) for t in out)
        if has_image and count > 1:
            raise InvalidRecord(f"{count} {IMAGE_TOKEN} markers for one image")
        if has_image and count == 0:
            out[0] = {"role": "user", "content": f"{IMAGE_TOKEN}\n{out[0]['content']}"}
        if not has_image and count:
            raise InvalidRecord(f"text-only record contains {IMAGE_TOKEN} but names no image")
    return out


# --- LLaVA-style JSON ----------------------------------------------------------------------


def _iter_json_records(json_path: Path) -> Iterator[tuple[str, Any]]:
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


def _check_image_bytes(data: bytes) -> None:
    """Decode the image once so a corrupt file is reported now, not mid-training."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            # JPEG can decode at 1/8 scale: the whole stream is still read (truncation is
            # caught) at a fraction of the cost.
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()


def _load_image(root: Path, rel: str) -> tuple[bytes | None, str | None]:
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
        _check_image_bytes(data)
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
    _check_shard_rows(shard_rows)
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
    out = _prepare_output(output, overwrite)
    sink = _ShardSink(out, "", LLAVA_SCHEMA, shard_rows, max_shard_bytes)
    summary = PrepareSummary(
        dataset="llava",
        output=output,
        options={"json": str(json_path), "images": None if images is None else str(images), "shard_rows": shard_rows},
    )

    def write_chunk(chunk: list[tuple[str, str, str | None, list[dict[str, str]]]], pool: ThreadPoolExecutor) -> None:
        # Reading and decoding run in threads (file I/O and PIL release the GIL); results
        # come back in input order, so rows stay in the order of the JSON file.
        loaded = pool.map(lambda c: _load_image(root, c[2]) if c[2] and root else (None, None), chunk)
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
        for where, record in _iter_json_records(json_file):
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
    sink.flush()
    summary.shards = sink.shards
    summary.seconds = time.perf_counter() - started
    if summary.rows_written == 0:
        problems = summary.missing_images + summary.invalid_records
        first = f"; first problem: {problems[0].where}: {problems[0].reason}" if problems else ""
        raise PrepareError(
            f"no rows to write: {summary.records_read} records in --json {str(json_path)!r}, "
            f"{len(summary.missing_images)} with missing/unreadable images, "
            f"{len(summary.invalid_records)} invalid{first}. Check that --images is the folder "
            "the 'image' paths are relative to"
        )
    _write_summary(out, summary)
    return summary


# --- Digits -------------------------------------------------------------------------------


def digit_caption(label: int) -> str:
    """0..9 -> "a handwritten digit zero" ... "a handwritten digit nine"."""
    if not 0 <= int(label) <= 9:
        raise ValueError(f"digit label must be 0..9 (got {label!r})")
    return f"a handwritten digit {DIGIT_WORDS[int(label)]}"


_DIGIT_RE = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.IGNORECASE)


def parse_digit(text: str) -> int | None:
    """The one digit a caption names (word or numeral), or None when it names none or
    several different ones, so an evaluation never credits a hedged caption."""
    found: set[int] = set()
    for match in _DIGIT_RE.finditer(text):
        token = match.group(1).lower()
        found.add(int(token) if token.isdigit() else DIGIT_WORDS.index(token))
    return found.pop() if len(found) == 1 else None


def render_digit(pixels: np.ndarray, image_size: int = DEFAULT_IMAGE_SIZE, resample: Resample = "nearest") -> bytes:
    """One 8x8 digit (values 0..16, 16 = full ink) -> PNG bytes of an RGB square.

    Drawn as dark ink on white like handwriting on paper. "nearest" keeps every source
    pixel as an exact block, so the original 8x8 grid can be read back from the image.
    """
    ink = np.clip(np.asarray(pixels, dtype=np.float64), 0.0, 16.0) * (255.0 / 16.0)
    gray = Image.fromarray(np.rint(255.0 - ink).astype(np.uint8))
    rgb = gray.resize((image_size, image_size), resample=_RESAMPLE[resample]).convert("RGB")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def split_digits(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of row indices -> (train, test); same seed, same split."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, test = train_test_split(
        indices, test_size=test_fraction, random_state=seed, shuffle=True, stratify=labels
    )
    return np.asarray(train), np.asarray(test)


def prepare_digits(
    output: str,
    *,
    shard_rows: int = DEFAULT_DIGITS_SHARD_ROWS,
    image_size: int = DEFAULT_IMAGE_SIZE,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
    resample: Resample = "nearest",
    overwrite: bool = False,
) -> PrepareSummary:
    """scikit-learn's 1797 digits -> OUTPUT/train/ and OUTPUT/test/ shards (+ _SUMMARY.json).

    Ids are "digits-NNNN" after the row in scikit-learn's array, so they are stable across
    seeds. Rows within each split are in the split's shuffled order.
    """
    started = time.perf_counter()
    from sklearn.datasets import load_digits

    _check_shard_rows(shard_rows)
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 4096:
        raise PrepareError(f"--image-size must be a whole number of pixels from 8 to 4096 (got {image_size!r})")
    if resample not in _RESAMPLE:
        raise PrepareError(f"--resample must be one of {sorted(_RESAMPLE)} (got {resample!r})")
    digits = load_digits()
    images: np.ndarray = digits.images
    labels = np.asarray(digits.target, dtype=np.int64)
    n_classes = len(np.unique(labels))
    fraction_ok = not isinstance(test_fraction, bool) and isinstance(test_fraction, (int, float))
    # A stratified split needs every class on both sides; scikit-learn rounds the test size up.
    n_test = math.ceil(test_fraction * len(labels)) if fraction_ok else 0
    if not fraction_ok or not n_classes <= n_test <= len(labels) - n_classes:
        low, high = n_classes / len(labels), 1 - n_classes / len(labels)
        raise PrepareError(
            f"--test-fraction must put at least {n_classes} of the {len(labels)} images on each "
            f"side of the stratified split, i.e. lie between about {low:.3f} and {high:.3f} "
            f"(got {test_fraction!r})"
        )
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise PrepareError(f"--seed must be a whole number from 0 to 2**32-1 (got {seed!r})")
    out = _prepare_output(output, overwrite)
    summary = PrepareSummary(
        dataset="digits",
        output=output,
        options={
            "image_size": image_size,
            "test_fraction": test_fraction,
            "seed": seed,
            "resample": resample,
            "shard_rows": shard_rows,
        },
    )
    train, test = split_digits(labels, test_fraction, seed)
    for split, indices in (("train", train), ("test", test)):
        sink = _ShardSink(out, split, DIGITS_SCHEMA, shard_rows, DEFAULT_MAX_SHARD_BYTES)
        for i in indices:
            png = render_digit(images[i], image_size, resample)
            caption = digit_caption(int(labels[i]))
            row = {
                "id": f"digits-{int(i):04d}",
                "image": png,
                "label": int(labels[i]),
                "caption": caption,
                "conversations": [
                    {"role": "user", "content": DIGIT_PROMPT},
                    {"role": "assistant", "content": caption},
                ],
            }
            sink.add(row, len(png))
        sink.flush()
        summary.shards.extend(sink.shards)
    summary.records_read = len(labels)
    summary.seconds = time.perf_counter() - started
    _write_summary(out, summary)
    return summary
