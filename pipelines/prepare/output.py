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

import json
import time
import logging
import os
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..storage import Location, Storage, StorageError, describe_error, parse_uri

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


def open_output(uri: str) -> tuple[Storage, Location]:
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
class Output:
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


def prepare_output(uri: str, overwrite: bool) -> Output:
    """Open --output and make sure earlier shards cannot mix with this run's."""
    storage, root = open_output(uri)
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
    return Output(storage, root, uri)


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


class ShardSink:
    """Collects rows and writes part-NNNNN.parquet files of `shard_rows` rows each."""

    def __init__(self, out: Output, prefix: str, schema: pa.Schema, shard_rows: int, max_shard_bytes: int) -> None:
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


def write_summary(out: Output, summary: PrepareSummary) -> None:
    text = json.dumps(summary.to_dict(), indent=2, ensure_ascii=False) + "\n"
    out.write_bytes(SUMMARY_NAME, text.encode("utf-8"))


def finish_output(out: Output, sink: ShardSink, summary: PrepareSummary, source: str, started: float,
                  hint: str = "") -> PrepareSummary:
    """Flush the last shard and write the summary; no rows at all is an error naming the
    source and its first problem (then nothing but the cleared output remains)."""
    sink.flush()
    summary.shards = sink.shards
    summary.seconds = time.perf_counter() - started
    if summary.rows_written == 0:
        problems = summary.missing_images + summary.invalid_records
        first = f"; first problem: {problems[0].where}: {problems[0].reason}" if problems else ""
        raise PrepareError(f"no rows to write: {summary.records_read} records in {source}, "
                           f"{len(summary.missing_images)} with missing/unreadable images, "
                           f"{len(summary.invalid_records)} invalid{first}{hint}")
    write_summary(out, summary)
    return summary


def check_shard_rows(shard_rows: int) -> None:
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
