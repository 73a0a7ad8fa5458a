"""Benchmark sets → Parquet shards the evaluate job reads, with the image bytes embedded:
an MMBench-style TSV, a yes/no JSON (POPE/MME style), LLaVA-style JSON questions, and
scikit-learn's held-out digits as a 10-way multiple-choice benchmark.

Every source becomes the same schema (EVAL_SCHEMA): `id`, `image` (encoded bytes),
`image_id` (where the image came from: its path, or its MMBench index), `question`,
`hint`, `choices` (multiple choice only), `answer` (a letter, yes/no, or the answer text)
and `category`. Records that cannot be scored (no answer, an answer that fits no option,
a missing or undecodable image) are skipped and listed in the summary, never fatal.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..evaluate.answers import yes_no_label
from ..evaluate.choices import LETTERS, answer_index
from .output import (DEFAULT_IMAGE_SIZE, DEFAULT_LLAVA_SHARD_ROWS, DEFAULT_MAX_SHARD_BYTES, DEFAULT_TEST_FRACTION,
                      DIGIT_WORDS, IMAGE_TOKEN, InvalidRecord, PrepareError, PrepareSummary, ShardSink, SkippedRecord,
                      check_shard_rows, finish_output, normalize_conversations, prepare_output)
from .llava import check_image_bytes, iter_json_records, load_image_file

EVAL_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.binary()), ("image_id", pa.string()), ("question", pa.string()),
    ("hint", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.string()), ("category", pa.string()),
])
DIGIT_QUESTION = "Which digit is written in the image?"
_CHUNK = 256  # records whose images are read and checked together


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _start(output: str, overwrite: bool, shard_rows: int, dataset: str, options: dict[str, Any]):
    check_shard_rows(shard_rows)
    out = prepare_output(output, overwrite)
    sink = ShardSink(out, "", EVAL_SCHEMA, shard_rows, DEFAULT_MAX_SHARD_BYTES)
    return out, sink, PrepareSummary(dataset=dataset, output=output, options=options)


# --- MMBench-style TSV -------------------------------------------------------------------------


def _tsv_rows(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    csv.field_size_limit(sys.maxsize)  # a base64 image is one (very long) field
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise PrepareError(f"--tsv {str(path)!r} cannot be opened ({exc.strerror}); pass an MMBench-style .tsv file") from None
    with handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"index", "question", "image"} - set(reader.fieldnames or [])
        if missing:
            raise PrepareError(f"--tsv {str(path)!r} has no {', '.join(sorted(missing))} column(s); an MMBench TSV has "
                               "index, question, hint, A, B, C, D, answer, category and image (base64)")
        for line, row in enumerate(reader, 2):
            yield line, row


def _is_reference(image: str) -> bool:
    # MMBench stores a repeated image once; later rows hold the first row's index instead.
    return image.isdigit() and len(image) < 16


def prepare_mmbench(tsv_path: str | os.PathLike[str], output: str, *, shard_rows: int = DEFAULT_LLAVA_SHARD_ROWS,
                    overwrite: bool = False) -> PrepareSummary:
    """MMBench TSV (base64 images, option columns A-F, answer letter, category, hint) →
    OUTPUT/part-NNNNN.parquet. Rows keep the file's order; test-split rows without an
    answer cannot be scored and are listed as invalid."""
    started = time.perf_counter()
    path = Path(tsv_path).expanduser()
    if not path.is_file():
        raise PrepareError(f"--tsv {str(tsv_path)!r} is not a file; pass an MMBench-style .tsv file")
    # A first pass finds which rows' images others refer to, so only those stay in memory.
    referenced = {(_text(r.get("image")) or "") for _, r in _tsv_rows(path)}
    referenced = {r for r in referenced if _is_reference(r)}
    out, sink, summary = _start(output, overwrite, shard_rows, "mmbench", {"tsv": str(tsv_path), "shard_rows": shard_rows})
    kept: dict[str, bytes] = {}
    for line, row in _tsv_rows(path):
        summary.records_read += 1
        where, index = f"line {line}", _text(row.get("index"))
        try:
            if index is None:
                raise InvalidRecord("no index")
            image = _text(row.get("image")) or ""
            if _is_reference(image):
                if image not in kept:
                    raise InvalidRecord(f"image refers to row index {image}, which has no image before this row")
                data = kept[image]
            else:
                try:
                    data = base64.b64decode(image, validate=True)
                    check_image_bytes(data)
                except (binascii.Error, ValueError) as exc:
                    summary.missing_images.append(SkippedRecord(where, index, f"image is not base64 ({exc})"))
                    continue
                except Exception as exc:  # PIL raises many types for a bad image
                    summary.missing_images.append(SkippedRecord(where, index, f"cannot decode ({type(exc).__name__}: {exc})"))
                    continue
                if index in referenced:
                    kept[index] = data
            options = _option_columns(row)
            answer = _text(row.get("answer"))
            if answer is None:
                raise InvalidRecord("no answer (a test split cannot be scored here)")
            answer_index(answer, options)
        except (InvalidRecord, ValueError) as exc:
            summary.invalid_records.append(SkippedRecord(where, index, str(exc)))
            continue
        sink.add({"id": index, "image": data, "image_id": image if _is_reference(image) else index,
                  "question": _text(row.get("question")), "hint": _text(row.get("hint")), "choices": options,
                  "answer": answer, "category": _text(row.get("category"))}, len(data))
    return finish_output(out, sink, summary, f"--tsv {str(tsv_path)!r}", started)


def _option_columns(row: dict[str, str]) -> list[str]:
    options = []
    for letter in LETTERS:
        text = _text(row.get(letter))
        if text is None or text.lower() == "nan":
            later = [c for c in LETTERS[len(options) + 1:] if _text(row.get(c)) not in (None, "nan")]
            if later:
                raise InvalidRecord(f"option {letter} is empty but {later[0]} is not")
            break
        options.append(text)
    if len(options) < 2:
        raise InvalidRecord(f"{len(options)} options; a multiple-choice question needs at least 2")
    return options


# --- JSON sources with an image folder -------------------------------------------------------


def _records_with_images(json_path: Path, images: Path, summary: PrepareSummary, parse, workers: int
                         ) -> Iterator[tuple[list[dict[str, Any]], bytes]]:
    """Parse each record into rows (`parse` raises InvalidRecord), then read and check its
    image in a thread pool; yields (rows, image bytes) in the file's order."""

    def flush(chunk: list[tuple[str, str | None, list[dict[str, Any]], str]], pool: ThreadPoolExecutor):
        for (where, rid, rows, rel), (data, problem) in zip(chunk, pool.map(lambda c: load_image_file(images, c[3]), chunk)):
            if problem is not None:
                summary.missing_images.append(SkippedRecord(where, rid, problem, rel))
            else:
                yield rows, data

    chunk: list[tuple[str, str | None, list[dict[str, Any]], str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for where, record in iter_json_records(json_path):
            summary.records_read += 1
            guess = record.get("question_id", record.get("id")) if isinstance(record, dict) else None
            try:
                if isinstance(record, InvalidRecord):
                    raise record
                if not isinstance(record, dict):
                    raise InvalidRecord(f"record is a {type(record).__name__}, not an object")
                rel = _text(record.get("image"))
                if rel is None:
                    raise InvalidRecord("no 'image': every benchmark question needs one")
                rows = parse(record)
            except (InvalidRecord, ValueError) as exc:
                summary.invalid_records.append(SkippedRecord(where, None if guess is None else str(guess), str(exc)))
                continue
            chunk.append((where, rows[0]["id"], rows, rel))
            if len(chunk) >= _CHUNK:
                yield from flush(chunk, pool)
                chunk = []
        yield from flush(chunk, pool)


def _record_id(record: dict[str, Any]) -> str:
    rid = _text(record.get("question_id", record.get("id")))
    if rid is None:
        raise InvalidRecord("no 'question_id' or 'id'")
    return rid


def _check_inputs(json_path: str | os.PathLike[str], images: str | os.PathLike[str]) -> tuple[Path, Path]:
    path = Path(json_path).expanduser()
    if not path.is_file():
        raise PrepareError(f"--json {str(json_path)!r} is not a file; pass a .json or .jsonl file")
    root = Path(os.path.abspath(Path(images).expanduser()))
    if not root.is_dir():
        raise PrepareError(f"--images {str(images)!r} is not a folder; pass the folder the records' 'image' paths "
                           "are relative to")
    return path, root


def _write_json_source(json_path, images, output, dataset: str, parse, *, shard_rows: int, overwrite: bool,
                       workers: int | None, category: str | None) -> PrepareSummary:
    started = time.perf_counter()
    path, root = _check_inputs(json_path, images)
    out, sink, summary = _start(output, overwrite, shard_rows, dataset,
                                {"json": str(json_path), "images": str(images), "category": category,
                                 "shard_rows": shard_rows})
    for rows, data in _records_with_images(path, root, summary, parse, workers or min(8, os.cpu_count() or 1)):
        for row in rows:
            sink.add({**row, "image": data, "category": row.get("category") or category}, len(data))
    return finish_output(out, sink, summary, f"--json {str(json_path)!r}", started)


def _yes_no_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    question = _text(record.get("text", record.get("question")))
    if question is None:
        raise InvalidRecord("no 'text' or 'question'")
    label = next((record[k] for k in ("label", "answer", "gt_answer") if _text(record.get(k)) is not None), None)
    if label is None:
        raise InvalidRecord("no 'label', 'answer' or 'gt_answer'")
    return [{"id": _record_id(record), "image_id": _text(record.get("image")), "question": question, "hint": None,
             "choices": None, "answer": yes_no_label(label), "category": _text(record.get("category"))}]


def prepare_yes_no(json_path: str | os.PathLike[str], images: str | os.PathLike[str], output: str, *,
                   shard_rows: int = DEFAULT_LLAVA_SHARD_ROWS, overwrite: bool = False, workers: int | None = None,
                   category: str | None = None) -> PrepareSummary:
    """POPE/MME-style records — {"question_id", "image", "text" (or "question"), "label" (or
    "answer"/"gt_answer"): yes|no, "category"?} as a JSON array or JSON lines — plus their
    image folder → shards. `category` names rows without one (e.g. POPE's "adversarial")."""
    return _write_json_source(json_path, images, output, "yes-no", _yes_no_rows, shard_rows=shard_rows,
                              overwrite=overwrite, workers=workers, category=category)


def _llava_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    rid, base = _record_id(record), {"image_id": _text(record.get("image")), "hint": _text(record.get("hint")),
                                     "category": _text(record.get("category"))}
    choices = record.get("choices")
    if choices is not None and (not isinstance(choices, list) or not all(_text(c) for c in choices)):
        raise InvalidRecord("'choices' must be a list of non-empty option texts")
    base["choices"] = [_text(c) for c in choices] if choices else None
    if "conversations" in record:
        turns = normalize_conversations(record["conversations"])
        pairs = [(q["content"], a["content"]) for q, a in zip(turns, turns[1:])
                 if q["role"] == "user" and a["role"] == "assistant"]
    else:
        question = _text(record.get("text", record.get("question")))
        answer = record.get("answer", record.get("gt_answer"))
        if question is None or _text(answer) is None:
            raise InvalidRecord("needs 'conversations', or 'question' (or 'text') and 'answer'")
        pairs = [(question, str(answer))]
    rows = []
    for k, (question, answer) in enumerate(pairs):
        question = question.replace(IMAGE_TOKEN, "").strip()
        if base["choices"]:
            answer_index(answer, base["choices"])  # raises naming the answer that fits no option
        rows.append({**base, "id": rid if len(pairs) == 1 else f"{rid}-{k}", "question": question,
                     "answer": answer.strip()})
    return rows


def prepare_llava_questions(json_path: str | os.PathLike[str], images: str | os.PathLike[str], output: str, *,
                            shard_rows: int = DEFAULT_LLAVA_SHARD_ROWS, overwrite: bool = False,
                            workers: int | None = None, category: str | None = None) -> PrepareSummary:
    """LLaVA-style records → benchmark shards. A record holds `id` (or `question_id`),
    `image`, and either `conversations` (each user turn followed by an assistant turn is one
    question, its reply the answer; ids get -0, -1, … when there are several) or `question`
    (or `text`) + `answer`; optional `choices`, `hint`, `category`."""
    return _write_json_source(json_path, images, output, "llava-eval", _llava_rows, shard_rows=shard_rows,
                              overwrite=overwrite, workers=workers, category=category)


# --- digits as 10-way multiple choice ----------------------------------------------------------


def digit_choice_rows(images: Iterable[Any], labels: Iterable[int], ids: Iterable[int], image_size: int,
                      resample: str) -> Iterator[dict[str, Any]]:
    from .digits import render_digit

    for pixels, label, i in zip(images, labels, ids):
        png = render_digit(pixels, image_size, resample)
        yield {"id": f"digits-{int(i):04d}", "image": png, "image_id": f"digits-{int(i):04d}",
               "question": DIGIT_QUESTION, "hint": None, "choices": list(DIGIT_WORDS),
               "answer": LETTERS[int(label)], "category": DIGIT_WORDS[int(label)]}


def prepare_digits_choice(output: str, *, image_size: int = DEFAULT_IMAGE_SIZE,
                          test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0, resample: str = "nearest",
                          shard_rows: int = 512, overwrite: bool = False) -> PrepareSummary:
    """The held-out digits of `prepare digits` with the same seed and test fraction (so none
    was trained on), as "Which digit…? A. zero … J. nine"; category: the digit's word."""
    from sklearn.datasets import load_digits

    from .digits import split_digits

    started = time.perf_counter()
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 8 <= image_size <= 4096:
        raise PrepareError(f"--image-size must be a whole number of pixels from 8 to 4096 (got {image_size!r})")
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise PrepareError(f"--test-fraction must lie between 0 and 1 (got {test_fraction!r})")
    digits = load_digits()
    try:
        _, test = split_digits(digits.target, test_fraction, seed)
    except ValueError as exc:  # too few rows on one side for a stratified split
        raise PrepareError(f"--test-fraction {test_fraction!r} / --seed {seed!r}: {exc}") from None
    out, sink, summary = _start(output, overwrite, shard_rows, "digits-choice",
                                {"image_size": image_size, "test_fraction": test_fraction, "seed": seed,
                                 "resample": resample, "shard_rows": shard_rows})
    for row in digit_choice_rows(digits.images[test], digits.target[test], test, image_size, resample):
        sink.add(row, len(row["image"]))
    summary.records_read = len(test)
    return finish_output(out, sink, summary, "scikit-learn's digits", started)
