"""4- and 8-bit LLM weights on CPU (bitsandbytes): which modules are quantized, how far the
logits move (tolerances measured here, stated below), and the caption job running quantized
on a released-layout model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from released_layouts import write_internlm2_release, write_phi3_release
from trol import load_model
from trol.convert import convert_released
from trol.quantization import quantized_modules, weight_bytes

# Largest and mean |logit difference| from the fp32 model over every position of the batch in
# `_batch` (both tiny released layouts, fp32 compute, bitsandbytes 0.50.2 on this CPU, with and
# without its AVX512-BF16 repacking). Measured: 4-bit max 1.33 / mean 0.160 (InternLM2 layout)
# and 1.19 / 0.127 (Phi-3 layout); 8-bit 0.095 / 0.0118 and 0.068 / 0.0076, against logits
# up to 3.7 in size. The bounds leave about half again as much: these random tiny weights
# (std 0.1) round far more coarsely, relatively, than trained ones.
TOLERANCE = {4: {"max": 2.0, "mean": 0.25}, 8: {"max": 0.15, "mean": 0.02}}
# Every projection of every decoder layer, for each layout's backbone.
DECODER_LINEARS = {"internlm2": ["self_attn.q_proj.base", "self_attn.k_proj.base", "self_attn.v_proj.base",
                                 "self_attn.o_proj.base", "mlp.gate_proj.base", "mlp.up_proj.base", "mlp.down_proj.base"],
                   "phi3": ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]}


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize")
    out = {}
    for family, write in (("internlm2", write_internlm2_release), ("phi3", write_phi3_release)):
        convert_released(str(write(root / f"{family}-release")), str(root / family))
        out[family] = root / family
    return out


def _batch(processor):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(2)]
    return processor(text=[processor.build_prompt("Describe the image.")] * 2, images=images)


@pytest.mark.parametrize("family", ["internlm2", "phi3"])
def test_only_decoder_projections_are_quantized_and_logits_stay_close(released, family):
    reference, processor = load_model(str(released[family]), dtype="float32", device="cpu")
    batch = _batch(processor)
    with torch.no_grad():
        expected = reference(**batch).logits
    for bits in (4, 8):
        model, _ = load_model(str(released[family]), dtype="float32", device="cpu", quantize=bits)
        layers = model.config.text_config.num_hidden_layers
        assert sorted(quantized_modules(model)) == sorted(
            f"language_model.model.layers.{i}.layer.{name}" for i in range(layers) for name in DECODER_LINEARS[family])
        kept = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}  # full precision
        assert any(n.startswith("vision.tower.") for n in kept) and any(n.startswith("vision.projector.") for n in kept)
        assert "language_model.lm_head" in kept and any(n.endswith("mixer.gate_linear") for n in kept)
        assert family != "internlm2" or sum(n.endswith((".plora_A", ".plora_B")) for n in kept) == 2 * len(
            quantized_modules(model)), "every partial-LoRA adapter stays, around its quantized linear"
        assert all(m.weight.dtype == torch.float32 for m in kept.values())
        assert weight_bytes(model) < weight_bytes(reference)
        with torch.no_grad():
            diff = (model(**batch).logits - expected).abs()
        assert 0 < diff.max() <= TOLERANCE[bits]["max"] and diff.mean() <= TOLERANCE[bits]["mean"], (bits, diff.max(), diff.mean())


@pytest.mark.slow
@pytest.mark.usefixtures("ray_session")
def test_caption_job_captions_every_row_with_4_and_8_bit_weights_on_cpu(released, write_shards, tmp_path):
    from pipelines.caption import run_caption
    from pipelines.specs import CaptionSpec, SpecError, build_spec

    rows = write_shards(str(tmp_path / "in"), [5, 3])

    def spec(bits: int):
        return build_spec(CaptionSpec, {"input": str(tmp_path / "in"), "output": str(tmp_path / f"out{bits}"),
                                        "model": str(released["internlm2"]), "quantize": bits, "id_columns": ["id"],
                                        "batch_size": 4, "dtype": "float32", "generation": {"max_new_tokens": 4}})

    for bits in (4, 8):
        summary = run_caption(spec(bits))
        assert summary["status"] == "complete" and summary["rows_out"] == len(rows) and summary["errors"] == 0
        table = pq.read_table([str(p) for p in sorted((tmp_path / f"out{bits}").glob("*.parquet"))])
        assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)
        assert table.column("error").null_count == table.num_rows
        assert all(isinstance(c, str) for c in table.column("caption").to_pylist())
        assert min(table.column("num_tokens").to_pylist()) >= 1
    # quantize is part of the spec fingerprint: 8-bit captions never land beside 4-bit ones
    # (refused while planning, before any model loads).
    with pytest.raises(SpecError, match="quantize"):
        run_caption(spec(8).model_copy(update={"output": str(tmp_path / "out4")}))


@pytest.mark.slow
def test_quantization_bench_smoke():
    from test_bench import run_bench

    r = run_bench("quantization", "--size", "tiny")
    assert 0 < r["weights_ratio_nf4_over_fp32"][0] < r["weights_ratio_int8_over_fp32"][0] < 1
    assert 0 < r["quantized_share_of_fp32"][0] < 1
    assert 0 < r["logit_max_diff_int8"][0] < r["logit_max_diff_nf4"][0]
