"""Saving and restoring a training run through Ray Train's checkpoint storage.

DDP (or one worker): rank 0 writes the trained weights (safetensors) and the full optimizer
state; every rank adds its RNG state. FSDP2: every rank writes its own shards with torch
distributed checkpointing and, on resume, downloads only the files its load plan reads (the
metadata, its shards, and whichever shard holds a replicated entry it needs), never the
whole checkpoint. Ray merges the ranks' folders into one checkpoint in storage (local or S3).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from .checkpoint import (MODEL_FILE, STATE_FILE, TrainState, load_train_state, rng_states, save_checkpoint,
                               save_train_state, set_rng_states)

PREFIX = "model."  # TokenLossModule holds the TroL model as `.model`; files use TroL's own keys
SHARDS_DIR = "sharded"


def _fetch(checkpoint: Any, names: list[str], directory: str) -> None:
    """Copy these files of a (local or remote) Ray checkpoint into `directory`."""
    fs, root = checkpoint.filesystem, checkpoint.path.rstrip("/")
    for name in names:
        target = os.path.join(directory, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with fs.open_input_stream(f"{root}/{name}") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)


class _FetchingReader(FileSystemReader):
    """A DCP reader that downloads a shard file only when this rank's plan reads from it."""

    def __init__(self, checkpoint: Any, directory: str):
        _fetch(checkpoint, [f"{SHARDS_DIR}/.metadata"], directory)
        super().__init__(os.path.join(directory, SHARDS_DIR))
        self._checkpoint, self._directory = checkpoint, directory

    def prepare_local_plan(self, plan):
        plan = super().prepare_local_plan(plan)
        files = sorted({self.storage_data[item.storage_index].relative_path for item in plan.items})
        _fetch(self._checkpoint, [f"{SHARDS_DIR}/{f}" for f in files], self._directory)
        return plan


class Checkpointer:
    def __init__(self, model: torch.nn.Module, optimizer, scheduler, *, stage: str, trainable: set[str],
                 sharded: bool, rank: int):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.stage, self.trainable, self.sharded, self.rank = stage, trainable, sharded, rank

    def _kept(self, state: dict[str, Any]) -> dict[str, Any]:
        """Stage "full": everything; stages 1/2: only what trains (the base is base_model)."""
        return state if self.stage == "full" else {k: v for k, v in state.items() if k in self.trainable}

    def full_model_state(self) -> dict[str, torch.Tensor]:
        """Trained weights under TroL's keys, gathered to CPU (a collective under FSDP)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix(PREFIX): v for k, v in self._kept(state).items()}

    def save(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """Write this rank's part and report it (every rank calls this)."""
        import ray.train
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        directory = tempfile.mkdtemp(prefix="trol-ckpt-")
        try:
            torch.save(rng_states(), os.path.join(directory, f"rng_{self.rank}.pt"))
            if self.sharded:
                self._save_shards(directory)
                if self.rank == 0:
                    save_train_state(directory, self.scheduler, state)
            else:
                model_state = self.full_model_state()
                optim_state = get_optimizer_state_dict(self.model, self.optimizer,
                                                       options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if self.rank == 0:
                    save_checkpoint(directory, model_state, optim_state, self.scheduler, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": self._kept(model_state), "optim": optim_state}

    def _save_shards(self, directory: str) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._sharded_state(), checkpoint_id=os.path.join(directory, SHARDS_DIR))

    def restore(self) -> TrainState:
        """The run's last checkpoint loaded into model, optimizer, scheduler and RNGs; a fresh
        state when there is none."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if not checkpoint:
            return TrainState()
        with tempfile.TemporaryDirectory(prefix="trol-resume-") as directory:
            names = [STATE_FILE, f"rng_{self.rank}.pt"] + ([] if self.sharded else [MODEL_FILE])
            _fetch(checkpoint, names, directory)
            optim_state, sched_state, state = load_train_state(directory)
            if self.sharded:
                self._load_shards(checkpoint, directory)
            else:
                self._load_full(os.path.join(directory, MODEL_FILE), optim_state)
            self.scheduler.load_state_dict(sched_state)
            set_rng_states(torch.load(os.path.join(directory, f"rng_{self.rank}.pt"), weights_only=True))
        state.resumed_from.append(state.step)
        return state

    def _load_full(self, model_file: str, optim_state: dict[str, Any]) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        weights = {PREFIX + k: v for k, v in load_file(model_file).items()}
        options = StateDictOptions(full_state_dict=True, strict=self.stage == "full")
        set_model_state_dict(self.model, weights, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optim_state, options=options)

    def _load_shards(self, checkpoint: Any, directory: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        target = self._sharded_state()
        dcp.load(target, storage_reader=_FetchingReader(checkpoint, directory))
        set_state_dict(self.model, self.optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optim"], options=StateDictOptions(strict=self.stage == "full"))
