"""From a benchmark's input row to the questions asked (one, or one per rotation), and from
a model's reply to a scored prediction. Pure functions: no Ray, no model.

An asked question carries what scoring needs through generation as plain columns:
`options` and `references` as JSON text (Arrow-friendly whatever the engine does with lists).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .answers import (DEFAULT_SHORT_INSTRUCTION, DEFAULT_YES_NO_INSTRUCTION, parse_yes_no, relaxed_correct,
                      short_answer_correct, yes_no_label)
from .benchmark_spec import BenchmarkSpec
from .choices import DEFAULT_CHOICE_INSTRUCTION, LETTERS, answer_index, build_choice_prompt, parse_choice, rotate

INSTRUCTIONS = {"multiple_choice": DEFAULT_CHOICE_INSTRUCTION, "yes_no": DEFAULT_YES_NO_INSTRUCTION,
                "short_answer": DEFAULT_SHORT_INSTRUCTION, "numeric": DEFAULT_SHORT_INSTRUCTION}
# Columns of an asked question (besides the image), in the order predictions are written.
# `problem`: why the row could not be asked (the image is then left out, so nothing is generated).
ASKED_COLUMNS = ("id", "benchmark", "category", "rotation", "prompt", "answer", "image_key", "options",
                 "references", "problem")


class RowProblem(ValueError):
    """The row cannot be asked as it is (no question, an answer that fits no option, …)."""


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or \
        (isinstance(value, str) and not value.strip())


def _text(value: Any) -> str | None:
    if _blank(value):
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # TSV/pandas readers turn integer ids and answers into floats
    return str(value).strip()


def _as_list(value: Any) -> list[Any] | None:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


def row_options(row: dict[str, Any], bench: BenchmarkSpec) -> list[str]:
    """A `choices` list, else option columns A, B, C, … up to the first empty one (a later
    option after an empty one would change every letter after it: an error)."""
    listed = _as_list(row.get(bench.choices_column))
    if listed is not None:
        options = [_text(o) for o in listed]
        if any(o is None for o in options):
            raise RowProblem(f"{bench.choices_column}: option {LETTERS[options.index(None)]} is empty")
        return [o for o in options if o is not None]
    options: list[str] = []
    for letter in LETTERS:
        text = _text(row.get(letter))
        if text is None:
            later = [c for c in LETTERS[len(options) + 1:] if _text(row.get(c)) is not None]
            if later:
                raise RowProblem(f"option column {letter} is empty but {later[0]} is not")
            break
        options.append(text)
    return options


def references(value: Any) -> list[str]:
    listed = _as_list(value)
    refs = [t for t in (_text(v) for v in (listed if listed is not None else [value])) if t is not None]
    if not refs:
        raise RowProblem("the answer is empty")
    return refs


def image_key(row: dict[str, Any], bench: BenchmarkSpec) -> str | None:
    """Which image a yes/no question is about (MME scores both questions of an image)."""
    if not bench.mme_score:
        return None
    if bench.image_key_column:
        return _text(row.get(bench.image_key_column))
    image = row.get(bench.image_column)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return hashlib.sha256(bytes(image)).hexdigest()[:16]
    return _text(image)


def row_id(row: dict[str, Any], bench: BenchmarkSpec, place: str) -> str:
    for column in ([bench.id_column] if bench.id_column else ["index", "id"]):
        value = _text(row.get(column))
        if value is not None:
            return value
    return place


def ask(row: dict[str, Any], bench: BenchmarkSpec, place: str) -> list[dict[str, Any]]:
    """The questions one input row becomes: one, or one per rotation for circular multiple
    choice. A row that cannot be asked becomes one question with `problem` set (scored
    wrong, reported apart as an error). `place` ("shard#row") is the id of rows without one."""
    base = {"id": row_id(row, bench, place), "benchmark": bench.name, "category": _text(row.get(bench.category_column)),
            "rotation": 0, "prompt": None, "answer": None, "image_key": None, "options": None, "references": None,
            "problem": None}
    try:
        question = _text(row.get(bench.question_column))
        if question is None:
            raise RowProblem(f"{bench.question_column}: the question is empty")
        instruction = INSTRUCTIONS[bench.kind] if bench.instruction is None else bench.instruction
        if bench.kind == "multiple_choice":
            return _ask_choice(row, bench, base, question, instruction)
        refs = references(row.get(bench.answer_column))
        if bench.kind == "yes_no":
            refs = [yes_no_label(refs[0])]
            already = instruction and instruction.lower().rstrip(".") in question.lower()
            prompt = question if not instruction or already else f"{question}\n{instruction}"
        else:
            prompt = f"{question}\n{instruction}" if instruction else question
        hint = _text(row.get(bench.hint_column))
        prompt = f"{hint}\n{prompt}" if hint else prompt
        return [{**base, "prompt": prompt, "answer": " | ".join(refs), "references": json.dumps(refs),
                 "image_key": image_key(row, bench)}]
    except (RowProblem, ValueError) as exc:
        return [{**base, "problem": f"bad row: {exc}"}]


def _ask_choice(row: dict[str, Any], bench: BenchmarkSpec, base: dict[str, Any], question: str,
                instruction: str) -> list[dict[str, Any]]:
    options = row_options(row, bench)
    if len(options) < 2:
        raise RowProblem(f"a multiple-choice question needs at least 2 options, found {len(options)}")
    correct = answer_index(_text(row.get(bench.answer_column)) or "", options)
    hint = _text(row.get(bench.hint_column))
    asked = []
    for shift in range(len(options) if bench.circular else 1):
        shown, answer = rotate(options, correct, shift)
        asked.append({**base, "rotation": shift, "answer": LETTERS[answer], "options": json.dumps(shown),
                      "references": json.dumps([LETTERS[answer]]),
                      "prompt": build_choice_prompt(question, shown, hint, instruction or None)})
    return asked


@dataclass(frozen=True)
class Scored:
    parsed: str | None
    correct: bool
    how: str | None = None  # multiple choice: "letter" or "text"


def score(kind: str, output: str | None, asked: dict[str, Any]) -> Scored:
    """One reply against its question. A question with an error (a bad image, or a row that
    could not be asked) has no reply: it is wrong, and the metrics count it apart."""
    if asked.get("error") is not None or asked.get("problem") is not None or output is None:
        return Scored(None, False)
    refs = json.loads(asked["references"])
    if kind == "multiple_choice":
        parsed = parse_choice(output, json.loads(asked["options"]))
        return Scored(parsed.letter, parsed.letter == refs[0], parsed.how)
    if kind == "yes_no":
        label = parse_yes_no(output)
        return Scored(label, label == refs[0])
    if kind == "short_answer":
        parsed, ok = short_answer_correct(output, refs)
        return Scored(parsed or None, ok)
    if kind == "numeric":
        parsed, ok = relaxed_correct(output, refs)
        return Scored(parsed or None, ok)
    raise ValueError(f"unknown benchmark kind {kind!r}")
