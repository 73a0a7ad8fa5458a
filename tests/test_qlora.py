"""QLoRA on CPU: stage 2 on 4-bit NF4 base weights (bitsandbytes) fine-tunes the tiny TroL on
digits through the finetune job. The loss falls; checkpoints hold only what trains; a worker
killed mid-run resumes from its checkpoint to the very losses and weights of an uninterrupted
run; the export (the 4-bit weights dequantized, LoRA merged) computes what was trained and
loads in the caption job."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipelines.finetune import run_finetune
from pipelines.prepare.digits import prepare_digits
from pipelines.specs import CaptionSpec, FinetuneSpec, build_spec
from train_hooks import KillOnce

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

STEPS, CHECKPOINT_EVERY, KILL_AFTER = 100, 60, 70


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with an LM head drawn at std 0.5 instead of 0.02: frozen at its init scale,
    the head cannot express a confident prediction (adapters alone plateau near loss 4.8 on
    digits, with or without quantization), which a pretrained head can."""
    from trol import TroLForConditionalGeneration, TroLProcessor

    model = TroLForConditionalGeneration.from_pretrained(tiny_model)
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("qlora-base")
    model.save_pretrained(out)
    TroLProcessor.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    prepare_digits(str(out), image_size=32, seed=0)
    return out


def qlora_spec(tmp_path: Path, digits: Path, base: Path, name: str, **overrides) -> FinetuneSpec:
    return build_spec(FinetuneSpec, dict(
        data=str(digits / "train"), output=str(tmp_path / "runs"), name=name, base_model=str(base), stage="2",
        quantize=4, lora={"r": 8, "alpha": 16}, workers=1, cpus_per_worker=0.5, batch_size=8, lr=3e-3,
        warmup_steps=10, max_steps=STEPS, checkpoint_every=CHECKPOINT_EVERY, log_every=20, **overrides))


def test_qlora_on_cpu_learns_resumes_exactly_and_exports_a_model_the_caption_job_loads(
        tmp_path, digits, base, write_shards):
    from pipelines.caption import run_caption
    from pipelines.finetune.parallel import load_for_stage
    from trol import TroLForConditionalGeneration

    # The two runs at once, each from its own thread: each has one worker, which steps on one
    # CPU (bitsandbytes' 4-bit layers on CPU), so one after the other would leave a CPU idle.
    with ThreadPoolExecutor(2) as pool:
        whole_run = pool.submit(run_finetune, qlora_spec(tmp_path, digits, base, "whole"))
        killed_run = pool.submit(run_finetune, qlora_spec(tmp_path, digits, base, "killed", max_failures=1),
                                 hooks=[KillOnce(KILL_AFTER, str(tmp_path / "killed-marker"))])
        whole, killed = whole_run.result(), killed_run.result()

    losses = [h["loss"] for h in whole["history"]]
    assert whole["steps"] == STEPS and len(losses) == STEPS // 20
    assert losses[-1] < losses[0] / 4, losses
    assert killed["resumed_from"] == [CHECKPOINT_EVERY], "restarted from the checkpoint, not from scratch"
    assert [h["loss"] for h in killed["history"]] == losses, "the resumed run repeats the uninterrupted one"
    exported = {name: load_file(str(tmp_path / "runs" / name / "model" / "model.safetensors")) for name in ("whole", "killed")}
    assert exported["whole"].keys() == exported["killed"].keys()
    assert all(torch.equal(exported["whole"][k], exported["killed"][k]) for k in exported["whole"])

    # A checkpoint holds what trains (LoRA, projector, mixers); the 4-bit base comes from base_model.
    checkpoints = sorted(p for p in (tmp_path / "runs" / "whole").glob("checkpoint_*") if p.is_dir())
    saved = load_file(str(checkpoints[-1] / "model.safetensors"))
    assert saved and all(".lora_" in k or k.startswith("vision.projector.") or ".mixer." in k for k in saved)
    # The export is a plain TroL checkpoint (no adapters, no quantization constants) that
    # computes what the 4-bit model with its adapters computed.
    assert exported["whole"].keys() == load_file(str(base / "model.safetensors")).keys()
    spec = qlora_spec(tmp_path, digits, base, "whole")
    trained, processor = load_for_stage(spec, str(base), torch.device("cpu"))
    trained.load_state_dict(saved, strict=False)
    export = TroLForConditionalGeneration.from_pretrained(tmp_path / "runs" / "whole" / "model")
    batch = processor(text=[processor.build_prompt("Describe the image.")], images=[Image.new("RGB", (32, 32), "white")])
    with torch.no_grad():
        torch.testing.assert_close(export.eval()(**batch).logits, trained.eval()(**batch).logits, atol=1e-5, rtol=0)

    rows = write_shards(str(tmp_path / "in"), [6])
    summary = run_caption(build_spec(CaptionSpec, {
        "input": str(tmp_path / "in"), "output": str(tmp_path / "captions"), "model": whole["model"],
        "id_columns": ["id"], "batch_size": 6, "generation": {"max_new_tokens": 6}}))
    table = pq.read_table(str(next((tmp_path / "captions").glob("*.parquet"))))
    assert summary["rows_out"] == len(rows) and table.column("error").null_count == len(rows)
    assert all(isinstance(c, str) for c in table.column("caption").to_pylist())
