"""Streaming, strict tensor conversion: read released shards one tensor at a time, map each
onto our names, write sharded safetensors, and prove every tensor on both sides is accounted.

Peak memory is one output shard (max_shard_bytes) plus the tensor being mapped, so a 7B
model converts on a machine with far less memory than the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# name, tensor → [(our name, tensor)]; [] for a source tensor that is checked and dropped.
TensorMapper = Callable[[str, torch.Tensor], list[tuple[str, torch.Tensor]]]


class ConversionError(ValueError):
    pass


def source_weight_files(src: Path) -> list[Path]:
    """The released model's weight files: sharded or single safetensors, else PyTorch .bin."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(p for p in src.glob(pattern) if p.is_file())
        if files:
            return files
    raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weight files found")


def iter_source_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """One tensor at a time (safetensors are memory-mapped; .bin files load one file at a time)."""
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            for name in list(state):
                yield name, state.pop(name)


class ShardWriter:
    """Writes model-0000i-of-0000N.safetensors plus model.safetensors.index.json."""

    def __init__(self, dst: Path, max_shard_bytes: int):
        self.dst, self.max_shard_bytes = dst, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.dst / f".shard-{len(self.written):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.written)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.written):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, self.dst / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_tensors(
    sources: Iterator[tuple[str, torch.Tensor]],
    mapper: TensorMapper,
    expected: dict[str, torch.Size],
    writer: ShardWriter,
) -> dict[str, int]:
    """Map and write every source tensor; fail naming any source tensor without a place, any
    produced name the model does not have (or has in another shape), and any model tensor
    nothing produced (it would be left uninitialised)."""
    produced: set[str] = set()
    counts = {"source_tensors": 0, "dropped_buffers": 0, "written_tensors": 0}
    for name, tensor in sources:
        counts["source_tensors"] += 1
        mapped = mapper(name, tensor)
        if not mapped:
            counts["dropped_buffers"] += 1
        for target, value in mapped:
            if target not in expected:
                raise ConversionError(f"source tensor {name} maps to {target}, which the TroL model does not have")
            if tuple(value.shape) != tuple(expected[target]):
                raise ConversionError(
                    f"source tensor {name} → {target}: shape {tuple(value.shape)}, model expects {tuple(expected[target])}"
                )
            if target in produced:
                raise ConversionError(f"{target} is produced twice (second time from {name})")
            produced.add(target)
            writer.add(target, value)
            counts["written_tensors"] += 1
    missing = sorted(set(expected) - produced)
    if missing:
        raise ConversionError(f"{len(missing)} model tensors got no value from the source, e.g. {missing[:5]}")
    writer.close()
    return counts


def expected_state(model_factory: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    """Names and shapes of the target model's persistent tensors, built on the meta device."""
    with torch.device("meta"):
        model = model_factory()
    return {name: t.shape for name, t in model.state_dict().items()}
