"""Driver-side rules for a run: where it may write on a cluster, and what a resume may change."""

from __future__ import annotations

import os
from typing import Any

from ..specs import FinetuneSpec, SpecError

# A resumed run continues the stored one's data order and tensors; these fields would
# silently change either (shapes, trainable set, which rows fall in which step), so a
# rerun that changes one is refused. Others (lr, max_steps, epochs, logging, eval,
# checkpoint cadence, storage) may change between attempts.
RESUME_FIXED = ("data", "base_model", "stage", "lora", "train_partial_lora", "quantize", "strategy", "workers", "batch_size",
                "grad_accum", "seed", "shuffle_window", "max_length", "length_policy", "image_column",
                "conversations_column", "caption_column", "prompt")


def check_resumable(stored: dict[str, Any], spec: FinetuneSpec) -> None:
    """Refuse a rerun whose spec differs from the stored one in a field that shapes the run."""
    current = spec.model_dump(mode="json")
    for field in RESUME_FIXED:
        if field in stored and stored[field] != current[field]:
            raise SpecError(field, f"was {stored[field]!r} when this run's checkpoints were written, now "
                            f"{current[field]!r}; a resume must keep it (restore it, or use a new name)")


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _under(path: str, roots: list[str]) -> bool:
    path = os.path.abspath(path.removeprefix("file://"))
    return any(os.path.commonpath([path, os.path.abspath(r)]) == os.path.abspath(r) for r in roots)


def check_nodes(spec: FinetuneSpec, nodes: int, base_model_is_local: bool) -> None:
    """With several nodes, every local path must be one all nodes see: checkpoints and the
    summary would otherwise land on different disks, and data tasks on other nodes would
    not find the shards."""
    if nodes <= 1:
        return
    fields = [("output", spec.output), ("data", spec.data)]
    if spec.eval_data:
        fields.append(("eval_data", spec.eval_data))
    if base_model_is_local:
        fields.append(("base_model", spec.base_model))
    for field, uri in fields:
        if _is_local(uri) and not _under(uri, spec.shared_paths):
            raise SpecError(field, f"{uri!r} is a local path but the cluster has {nodes} nodes; use s3:// "
                            "or a folder every node mounts, declared in shared_paths")


def cluster_node_count() -> int:
    """Alive Ray nodes that can run work (the head counts when it has CPUs)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
