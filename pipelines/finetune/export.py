"""The end of a run: one consolidated TroL folder, the loss and data-wait curves, the summary."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..storage import parse_uri
from .checkpoint import TrainState, export_model, write_loss_curve

MODEL_SUBDIR = "model"


def export_run(model, checkpointer, processor, spec, config: dict[str, Any], state: TrainState,
               metrics: dict[str, Any], model_path: str, *, peak_source: str, flops_per_token: float) -> dict[str, Any]:
    """Every rank calls this (gathering sharded weights is a collective); rank 0 writes
    output/name/{model/, loss_curve.png, training_summary.json} and returns the summary."""
    import ray.train

    from .parallel import inner, load_for_stage

    full_state = checkpointer.full_model_state()
    if ray.train.get_context().get_world_rank() != 0:
        return {}
    storage = config["storage"]
    # The base (with adapters for stage 2) plus what was trained is the model. Under QLoRA the
    # adapters learned to correct the 4-bit weights, so the base is those weights dequantized:
    # the export computes what was trained and evaluated, in ordinary tensors any loader reads.
    import torch

    plain, _ = load_for_stage(spec, model_path, torch.device("cpu"), quantize=False)
    if spec.quantize:
        from trol.quantization import dequantized_weights

        full_state = {**dequantized_weights(inner(model).model), **full_state}
    result = plain.load_state_dict(full_state, strict=spec.stage == "full")
    if result.unexpected_keys:
        raise ValueError(f"trained weights do not fit the base model: {sorted(result.unexpected_keys)[:3]}")
    run_dir = parse_uri(config["run_dir"])
    with tempfile.TemporaryDirectory() as directory:
        export_model(plain, processor, os.path.join(directory, MODEL_SUBDIR), keep_adapter=spec.keep_adapter)
        write_loss_curve(state.history, os.path.join(directory, "loss_curve.png"), f"{spec.name}: stage {spec.stage}")
        for root, _, files in os.walk(directory):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
                with open(os.path.join(root, name), "rb") as f:
                    storage.write_bytes(run_dir.join(rel), f.read())
    seconds = max(state.train_seconds, 1e-9)
    summary = {
        "name": spec.name, "stage": spec.stage, "workers": spec.workers, "strategy": spec.strategy,
        "steps": state.step, "epochs": state.epoch,  # completed epochs
        "model": run_dir.join(MODEL_SUBDIR).uri,
        "loss_curve": run_dir.join("loss_curve.png").uri, "final_metrics": metrics,
        "history": state.history, "resumed_from": state.resumed_from, "data": state.data,
        "tokens_seen": state.tokens_seen, "train_seconds": round(state.train_seconds, 1),
        "mean_tokens_per_s": state.tokens_seen / seconds,
        "data_wait_fraction": state.data_wait_seconds / seconds,
        "data_startup_seconds": round(state.data_startup_seconds, 1),
        "data_wait_curve": [{"step": h["step"], "data_wait": h["data_wait"]} for h in state.history],
        "flops_per_token": flops_per_token,  # 6 x parameters traversed, decoder layers counted twice
        "peak_flops_source": peak_source,
        "mean_mfu": _mean_mfu(state.history),
    }
    storage.write_json(run_dir.join("training_summary.json"), summary)
    return summary


def _mean_mfu(history: list[dict[str, Any]]) -> float | None:
    """Token-weighted over the logged intervals (each interval's MFU ∝ its tokens/s)."""
    points = [(h["mfu"], h["seconds"]) for h in history if "mfu" in h and "seconds" in h]
    total = sum(s for _, s in points)
    return sum(m * s for m, s in points) / total if total else None
