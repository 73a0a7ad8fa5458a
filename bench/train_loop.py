"""A bare torch training loop (no Ray) on the digits shards `python -m jobs.prepare digits`
writes: the same model, optimizer, schedule, clipping and token count as the finetune job,
so its speed is the reference the job is measured against. Also used by the ablation."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import torch

from trol import TroLForConditionalGeneration, TroLProcessor
from trol.training import cosine_with_warmup, prepare_for_stage

from .data import decode

PROMPT = "Describe the image."
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@dataclass
class TrainSettings:
    steps: int
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    max_length: int = 2048
    seed: int = 0
    traversal: str | None = None  # None: the model folder's own mode


@dataclass
class TrainRun:
    model: TroLForConditionalGeneration
    processor: TroLProcessor
    load_s: float
    loop_s: float
    data_wait_s: float
    tokens: int
    losses: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)


def training_batches(folder: Path, processor: TroLProcessor, batch_size: int, max_length: int,
                     seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless right-padded batches: shards read one at a time, rows shuffled per shard and
    epoch, each row tokenised and its image prepared when its batch is built."""
    shards = sorted(folder.glob("*.parquet"))
    rng = random.Random(seed)
    pending: list[tuple[dict, object]] = []
    while True:
        for shard in shards:
            rows = pq.read_table(shard, columns=["image", "conversations"]).to_pylist()
            rng.shuffle(rows)
            for row in rows:
                enc = processor.encode_conversation(row["conversations"], has_image=True, max_length=max_length)
                if enc is None:
                    continue
                pending.append((enc, processor.prepare_image(decode(row["image"]))))
                if len(pending) == batch_size:
                    yield processor.collate([e for e, _ in pending], [p for _, p in pending])
                    pending = []


def train(model_dir: Path, data: Path, settings: TrainSettings) -> TrainRun:
    """Stage "full" training for `settings.steps` optimizer steps; data waiting is timed apart."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    model = TroLForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    if settings.traversal:
        model.set_traversal(settings.traversal)
    prepare_for_stage(model, "full")
    processor = TroLProcessor.from_pretrained(str(model_dir))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    scheduler = cosine_with_warmup(optimizer, settings.warmup_steps, settings.steps)
    batches = training_batches(data, processor, settings.batch_size, settings.max_length, settings.seed)
    run = TrainRun(model, processor, time.perf_counter() - started, 0.0, 0.0, 0)
    loop_start = time.perf_counter()
    for _ in range(settings.steps):
        step_start = time.perf_counter()
        batch = next(batches)
        run.data_wait_s += time.perf_counter() - step_start
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.losses.append(loss.item())
        run.tokens += int(batch["attention_mask"].sum())
        run.step_s.append(time.perf_counter() - step_start)
    run.loop_s = time.perf_counter() - loop_start
    model.eval()
    return run


def parse_digit(text: str) -> int | None:
    """The one digit a caption names as a word, or None when it names none or several."""
    words = {w.strip(".,;:!?") for w in text.lower().split()}
    found = {i for i, w in enumerate(NUMBER_WORDS) if w in words}
    return found.pop() if len(found) == 1 else None


@torch.inference_mode()
def caption_accuracy(model: TroLForConditionalGeneration, processor: TroLProcessor, folder: Path,
                     limit: int, batch_size: int = 64, max_new_tokens: int = 8) -> float:
    """Share of held-out digits whose greedy caption names the right digit."""
    rows: list[dict] = []
    for shard in sorted(folder.glob("*.parquet")):
        rows.extend(pq.read_table(shard, columns=["image", "label"]).to_pylist())
    rows = rows[:limit]
    right = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pixels = [processor.prepare_image(decode(r["image"])) for r in chunk]
        batch = processor(text=[processor.build_prompt(PROMPT)] * len(chunk), images=pixels)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        texts = processor.batch_decode(out[:, batch["input_ids"].shape[1]:])
        right += sum(parse_digit(t) == int(r["label"]) for t, r in zip(texts, chunk))
    return right / max(len(rows), 1)
