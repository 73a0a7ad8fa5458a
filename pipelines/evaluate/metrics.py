"""Metrics of one benchmark from its scored predictions: overall and per category, with
counts. Pure functions over lists of prediction dicts (the rows of predictions.parquet).

Every metric can be recounted from the predictions file: `correct`, `error`, `parsed`,
`category`, `rotation` and `image_key` are all there.

- count / correct / accuracy: questions (for circular multiple choice a question is all
  its rotations, right only if every rotation is); errors (bad image or row) and unparsed
  replies are wrong, and also counted apart.
- yes/no: POPE's precision, recall, F1 and yes-ratio, with "yes" the positive class; a
  reply that is neither yes nor no is never a predicted yes, so it lowers recall, not
  precision. With mme_score, MME's score per category: acc + acc+ in percent (acc+: an
  image whose questions are all right), and their sum over categories.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

UNCATEGORISED = "(none)"


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _questions(rows: list[dict[str, Any]], circular: bool) -> list[list[dict[str, Any]]]:
    """Rows grouped into questions: each row alone, or (circular) all rotations of an id."""
    if not circular:
        return [[r] for r in rows]
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        grouped[(r["benchmark"], r["id"])].append(r)
    return list(grouped.values())


def _counts(questions: list[list[dict[str, Any]]]) -> dict[str, Any]:
    count = len(questions)
    correct = sum(all(r["correct"] for r in q) for q in questions)
    return {
        "count": count,
        "correct": correct,
        "accuracy": _ratio(correct, count),
        "errors": sum(any(r["error"] is not None for r in q) for q in questions),
        "unparsed": sum(any(r["error"] is None and r["parsed"] is None for r in q) for q in questions),
    }


def yes_no_counts(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    rows = list(rows)
    gold_yes = [r for r in rows if r["answer"] == "yes"]
    tp = sum(r["parsed"] == "yes" for r in gold_yes)
    fp = sum(r["parsed"] == "yes" for r in rows if r["answer"] == "no")
    tn = sum(r["parsed"] == "no" for r in rows if r["answer"] == "no")
    fn = len(gold_yes) - tp
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, len(gold_yes))
    f1 = _ratio(2 * precision * recall, precision + recall) if precision is not None and recall is not None else None
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "other": sum(r["parsed"] is None for r in rows),
            "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": _ratio(sum(r["parsed"] == "yes" for r in rows), len(rows))}


def mme_category(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """acc (% of questions right) + acc+ (% of images with every question right)."""
    by_image: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        by_image[r["image_key"] if r["image_key"] is not None else f"row:{r['id']}"].append(bool(r["correct"]))
    acc = 100.0 * sum(r["correct"] for r in rows) / len(rows) if rows else 0.0
    acc_plus = 100.0 * sum(all(v) for v in by_image.values()) / len(by_image) if by_image else 0.0
    return {"images": len(by_image), "acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def _block(rows: list[dict[str, Any]], kind: str, circular: bool, mme: bool) -> dict[str, Any]:
    out = _counts(_questions(rows, circular))
    if kind == "multiple_choice":
        out["parsed_from_text"] = sum(r.get("parsed_by") == "text" for r in rows)
        if circular:
            out["rows"] = len(rows)
            first = [[r] for r in rows if r["rotation"] == 0]
            out["single_pass_accuracy"] = _counts(first)["accuracy"]
    if kind == "yes_no":
        out.update(yes_no_counts(rows))
        if mme:
            out["mme"] = mme_category(rows)
    return out


def benchmark_metrics(rows: list[dict[str, Any]], *, kind: str, circular: bool = False,
                      mme_score: bool = False) -> dict[str, Any]:
    """{"overall": {...}, "categories": {name: {...}}} (+ MME's "mme_total" with mme_score)."""
    by_category: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_category[r["category"] if r["category"] is not None else UNCATEGORISED].append(r)
    categorised = set(by_category) != {UNCATEGORISED}
    out: dict[str, Any] = {
        "kind": kind, "circular": circular, "mme_score": mme_score,
        "overall": _block(rows, kind, circular, mme_score),
        "categories": {c: _block(rs, kind, circular, mme_score) for c, rs in sorted(by_category.items())}
        if categorised else {},
    }
    if mme_score:
        parts = out["categories"] or {UNCATEGORISED: out["overall"]}
        # MME's total is the sum of its categories' scores, not a score of the pooled rows.
        out["mme_total"] = sum(block["mme"]["score"] for block in parts.values())
        out["overall"].pop("mme", None)
    return out


def headline(block: dict[str, Any], bench: dict[str, Any] | None = None) -> dict[str, float | None]:
    """The figures a comparison shows for one block (overall or a category)."""
    figures: dict[str, float | None] = {"accuracy": block.get("accuracy")}
    for key in ("single_pass_accuracy", "f1", "yes_ratio"):
        if key in block:
            figures[key] = block[key]
    if "mme" in block:
        figures["mme_score"] = block["mme"]["score"]
    if bench is not None and "mme_total" in bench and block is bench["overall"]:
        figures["mme_score"] = bench["mme_total"]
    return figures
