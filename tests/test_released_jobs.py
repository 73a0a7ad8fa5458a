"""The caption and finetune jobs on tiny checkpoints in the released TroL layouts: a released
folder named directly as the model (converted once into the cache), a converted TroL-3.8B
(tiled images, different token counts per row), and stage-2 training on top of the partial
LoRA of a converted TroL-1.8B/7B."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors import safe_open

from released_layouts import write_internlm2_release, write_phi3_release
from trol import TroLForConditionalGeneration
from trol.convert import convert_released

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

CAPTION = {"batch_size": 4, "dtype": "float32", "generation": {"max_new_tokens": 4}, "id_columns": ["id"]}


@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    internlm2 = write_internlm2_release(root / "TroL-7B-tiny")
    phi3 = write_phi3_release(root / "TroL-3.8B-tiny")
    convert_released(str(phi3), str(root / "trol-3.8b"))
    convert_released(str(internlm2), str(root / "trol-7b"))
    return {"internlm2": internlm2, "phi3": phi3, "phi3_converted": root / "trol-3.8b",
            "internlm2_converted": root / "trol-7b"}


def run_caption(tmp_path: Path, model: Path, **fields) -> int:
    from jobs.caption import main

    spec = {**CAPTION, "input": str(tmp_path / "in"), "output": str(tmp_path / "out"), "model": str(model), **fields}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return main([str(tmp_path / "spec.yaml")])


def check_outputs(folder: Path, rows: list[dict]) -> None:
    tables = [pq.read_table(p) for p in sorted(folder.glob("*.parquet"))]
    ids = [i for t in tables for i in t.column("id").to_pylist()]
    assert sorted(ids) == sorted(r["id"] for r in rows)
    for table in tables:
        assert table.column("error").null_count == table.num_rows, table.column("error").to_pylist()
        assert all(isinstance(c, str) for c in table.column("caption").to_pylist())


def test_caption_job_converts_a_released_folder_once_and_captions(releases, write_shards, tmp_path):
    rows = write_shards(str(tmp_path / "in"), [5, 3])
    cache = tmp_path / "cache"
    assert run_caption(tmp_path, releases["internlm2"], model_cache_dir=str(cache)) == 0
    check_outputs(tmp_path / "out", rows)
    converted = [p for p in cache.iterdir() if p.is_dir() and p.name.startswith("converted-")]
    assert len(converted) == 1 and (converted[0] / "conversion.json").is_file()


def test_caption_job_on_a_converted_trol_3_8b_with_tiled_images(releases, write_shards, tmp_path):
    rows = write_shards(str(tmp_path / "in"), [6])  # sample images of several aspect ratios
    assert run_caption(tmp_path, releases["phi3_converted"]) == 0
    check_outputs(tmp_path / "out", rows)


def test_finetune_stage2_on_a_converted_model_keeps_the_partial_lora(releases, tmp_path):
    from jobs.finetune import main
    from pipelines.prepare.digits import prepare_digits

    prepare_digits(str(tmp_path / "digits"), shard_rows=200, image_size=20, seed=0)
    spec = {"data": str(tmp_path / "digits" / "train"), "output": str(tmp_path / "runs"), "name": "released",
            "base_model": str(releases["internlm2_converted"]), "stage": 2, "lora": {"r": 4, "alpha": 8},
            "workers": 1, "cpus_per_worker": 0.5, "batch_size": 4, "lr": 1e-3, "max_steps": 3,
            "checkpoint_every": 3, "max_length": 1400}
    (tmp_path / "finetune.yaml").write_text(yaml.safe_dump(spec))
    assert main([str(tmp_path / "finetune.yaml")]) == 0
    trained = tmp_path / "runs" / "released" / "model"
    model = TroLForConditionalGeneration.from_pretrained(trained)
    assert len(model.partial_lora_layers()) == 14, "the partial LoRA survives training and export"
    base = TroLForConditionalGeneration.from_pretrained(releases["internlm2_converted"])
    base_state, trained_state = base.state_dict(), model.state_dict()
    plora = [k for k in trained_state if ".plora_" in k]
    assert plora and all(torch.equal(trained_state[k], base_state[k]) for k in plora), "frozen by default"
    changed = [k for k in trained_state if ".q_proj.base.weight" in k and not torch.equal(trained_state[k], base_state[k])]
    assert changed, "LoRA merged into the linear inside the partial LoRA"
    with safe_open(str(next(trained.glob("*.safetensors"))), framework="pt") as f:
        assert all(".lora_" not in k for k in f.keys()), "no unmerged peft keys in the export"
