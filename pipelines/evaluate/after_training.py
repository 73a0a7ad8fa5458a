"""Fine-tuning's `evaluate:` section: check the benchmarks before training starts, and at
the end score the trained model (and the base model) and put both into
training_summary.json, with the table that compares them."""

from __future__ import annotations

import logging
import os
from typing import Any

from ..specs import SpecError
from ..storage import Location, Storage, parse_uri
from .plan import plan_benchmarks
from .report import compare_table

log = logging.getLogger(__name__)


def _evaluation_dir(spec: Any) -> Location:
    return parse_uri(spec.output).join(spec.name, "evaluation")


def check_evaluation(spec: Any, storage: Storage, nodes: int = 1) -> None:
    """Before any training: every benchmark's shards and columns (SpecError names
    `evaluate.benchmarks.N.…`), and with several nodes, that local benchmark data lies
    under `shared_paths` (the readers run on any node)."""
    if spec.evaluate is None:
        return
    plan_benchmarks(spec.evaluate.benchmarks, spec.base_model, _evaluation_dir(spec).uri, storage,
                    field_prefix="evaluate.", model_field="base_model")
    if nodes > 1:
        roots = [os.path.abspath(r) for r in spec.shared_paths]
        for i, bench in enumerate(spec.evaluate.benchmarks):
            local = "://" not in bench.data or bench.data.startswith("file://")
            path = os.path.abspath(bench.data.removeprefix("file://"))
            if local and not any(os.path.commonpath([path, r]) == r for r in roots):
                raise SpecError(f"evaluate.benchmarks.{i}.data", f"{bench.data!r} is a local path but the cluster has "
                                f"{nodes} nodes; use s3:// or a folder every node mounts, declared in shared_paths")


def _evaluate_spec(spec: Any, model: str, output: Location):
    from .spec import EvaluateSpec

    section = spec.evaluate
    return EvaluateSpec(benchmarks=section.benchmarks, model=model, output=output.uri,
                        max_new_tokens=section.max_new_tokens, batch_size=section.batch_size, concurrency=1,
                        gpus_per_actor=float(spec.gpus_per_worker), model_cache_dir=spec.model_cache_dir,
                        storage=spec.storage)


def evaluate_after_training(spec: Any, summary: dict[str, Any], storage: Storage) -> dict[str, Any]:
    """Score the trained model (and base_model with compare_base); returns the summary with
    `evaluation` added, after writing it to training_summary.json again. A failed
    evaluation is recorded there and raised: the trained model stays where it is."""
    from .job import run_evaluation

    out = _evaluation_dir(spec)
    models = ([("base", spec.base_model)] if spec.evaluate.compare_base else []) + [("trained", summary["model"])]
    evaluation: dict[str, Any] = {}
    try:
        for label, model in models:
            log.info("evaluating the %s model %s", label, model)
            metrics = run_evaluation(_evaluate_spec(spec, model, out.join(label)))
            evaluation[label] = {k: metrics[k] for k in ("model", "status", "benchmarks", "failed_shards", "outputs")}
        if "base" in evaluation:
            evaluation["comparison"] = compare_table(evaluation["trained"], evaluation["base"],
                                                     this_label="trained", other_label="base")
    except Exception as exc:
        evaluation["error"] = f"{type(exc).__name__}: {str(exc).strip()[:500]}"
        raise RuntimeError(f"training finished and its model is saved, but the evaluation failed: "
                           f"{evaluation['error']}; rerun the same spec to retry it") from exc
    finally:
        summary = {**summary, "evaluation": evaluation}
        storage.write_json(parse_uri(spec.output).join(spec.name, "training_summary.json"), summary)
    return summary


def format_evaluation(summary: dict[str, Any]) -> str:
    evaluation = summary.get("evaluation") or {}
    if "comparison" in evaluation:
        return "evaluation, base → trained:\n" + evaluation["comparison"]
    trained = evaluation.get("trained")
    if not trained:
        return ""
    lines = ["evaluation of the trained model:"]
    for name, bench in trained["benchmarks"].items():
        accuracy = bench["overall"]["accuracy"]
        lines.append(f"  {name}: {'—' if accuracy is None else f'{100 * accuracy:.1f} %'}")
    return "\n".join(lines)
