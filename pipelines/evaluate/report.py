"""Tables: one run's metrics.md, and two runs side by side with deltas."""

from __future__ import annotations

from typing import Any

from .metrics import headline

_PERCENT = {"accuracy", "single_pass_accuracy", "yes_ratio", "precision", "recall", "f1"}
_LABELS = {"accuracy": "accuracy", "single_pass_accuracy": "single pass", "f1": "F1", "yes_ratio": "yes ratio",
           "mme_score": "MME score", "count": "questions"}


def _figure(name: str, value: float | None) -> str:
    if value is None:
        return "—"
    if name == "count":
        return f"{value:.0f}"
    return f"{100 * value:.1f} %" if name in _PERCENT else f"{value:.1f}"


def _extras(block: dict[str, Any], bench: dict[str, Any], overall: bool) -> str:
    parts = []
    if "f1" in block:
        parts.append(f"P {_figure('precision', block['precision'])}, R {_figure('recall', block['recall'])}, "
                     f"F1 {_figure('f1', block['f1'])}, yes {_figure('yes_ratio', block['yes_ratio'])}")
    if "mme" in block:
        m = block["mme"]
        parts.append(f"MME {m['score']:.1f} (acc {m['acc']:.1f} + acc+ {m['acc_plus']:.1f}, {m['images']} images)")
    if overall and "mme_total" in bench:
        parts.append(f"MME total {bench['mme_total']:.1f}")
    if "single_pass_accuracy" in block:
        parts.append(f"single pass {_figure('accuracy', block['single_pass_accuracy'])} ({block['rows']} rows asked)")
    if block.get("parsed_from_text"):
        parts.append(f"{block['parsed_from_text']} read from the option's text")
    return "; ".join(parts)


def metrics_table(metrics: dict[str, Any]) -> str:
    """metrics.md: a row per benchmark (overall) and per category."""
    lines = [f"# Evaluation of {metrics.get('model', '?')}", "",
             "| benchmark | category | questions | correct | accuracy | errors | unparsed | more |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, bench in metrics["benchmarks"].items():
        blocks = [("all", bench["overall"], True)] + [(c, b, False) for c, b in bench["categories"].items()]
        for category, block, overall in blocks:
            lines.append(f"| {name if overall else ''} | {category} | {block['count']} | {block['correct']} | "
                         f"{_figure('accuracy', block['accuracy'])} | {block['errors']} | {block['unparsed']} | "
                         f"{_extras(block, bench, overall)} |")
    if metrics.get("failed_shards"):
        lines += ["", f"**Incomplete:** {len(metrics['failed_shards'])} shard(s) could not be read:"]
        lines += [f"- {uri}: {why}" for uri, why in metrics["failed_shards"].items()]
    return "\n".join(lines) + "\n"


def compare_table(this: dict[str, Any], other: dict[str, Any], *, this_label: str | None = None,
                  other_label: str | None = None) -> str:
    """Both runs side by side (other first, then this one) with Δ = this − other, for each
    benchmark and category either run has, and each headline figure of its kind."""
    a_label = other_label or str(other.get("model", "other"))
    b_label = this_label or str(this.get("model", "this"))
    lines = [f"| benchmark | category | metric | {a_label} | {b_label} | Δ |", "|---|---|---|---:|---:|---:|"]
    names = list(other.get("benchmarks", {})) + [n for n in this.get("benchmarks", {}) if n not in other.get("benchmarks", {})]
    for name in names:
        a_bench, b_bench = other["benchmarks"].get(name), this["benchmarks"].get(name)
        categories = ["all"]
        for bench in (a_bench, b_bench):
            categories += [c for c in (bench or {}).get("categories", {}) if c not in categories]
        for category in categories:
            a_fig, b_fig = _figures(a_bench, category), _figures(b_bench, category)
            for metric in list(a_fig) + [m for m in b_fig if m not in a_fig]:
                a, b = a_fig.get(metric), b_fig.get(metric)
                delta = "—" if a is None or b is None else _delta(metric, b - a)
                label = _LABELS.get(metric, metric)
                lines.append(f"| {name if category == 'all' and metric == 'accuracy' else ''} | "
                             f"{category if metric == 'accuracy' else ''} | {label} | {_figure(metric, a)} | "
                             f"{_figure(metric, b)} | {delta} |")
    return "\n".join(lines) + "\n"


def _figures(bench: dict[str, Any] | None, category: str) -> dict[str, float | None]:
    if bench is None:
        return {}
    block = bench["overall"] if category == "all" else bench["categories"].get(category)
    if block is None:
        return {}
    figures = headline(block, bench)
    if category == "all":
        figures["count"] = block["count"]
    return figures


def _delta(metric: str, value: float) -> str:
    if metric in _PERCENT:
        return f"{100 * value:+.1f} pt"
    return f"{value:+.0f}" if metric == "count" else f"{value:+.1f}"
