"""Smoke runs of every benchmark at --size tiny: each must finish and print a MACHINE line and
well-formed RESULT lines with sane values. Plus the torch-only GPU model's own equations:
its cached `full` decoding must equal recomputing the sequence."""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
RESULT_LINE = re.compile(r"^RESULT (?P<name>[a-z0-9_.]+)=(?P<value>\S+) (?P<unit>\S+)$")


def run_bench(module: str, *args: str, timeout: int = 600) -> dict[str, tuple[float, str]]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    machine = [line for line in lines if line.startswith("MACHINE ")]
    assert len(machine) == 1, proc.stdout
    facts = dict(item.split("=", 1) for item in shlex.split(machine[0])[1:])
    assert {"cpu_model", "cores", "torch_threads", "device", "dtype"} <= facts.keys()
    results = {}
    for line in lines:
        if line.startswith("RESULT"):
            match = RESULT_LINE.match(line)
            assert match, f"malformed: {line!r}"
            value = float(match["value"])
            assert math.isfinite(value), line
            assert match["name"] not in results, f"printed twice: {line}"
            results[match["name"]] = (value, match["unit"])
    assert results, proc.stdout
    return results


def assert_positive(results: dict[str, tuple[float, str]], *names: str) -> None:
    for name in names:
        assert name in results, sorted(results)
        assert results[name][0] > 0, (name, results[name])


@pytest.mark.slow
def test_traversal_cost_smoke():
    r = run_bench("traversal_cost", "--size", "tiny", "--repeats", "3")
    assert_positive(r, *(f"prefill_ms_{m}" for m in ("off", "prefill", "full")),
                    "decode_time_ratio_full_over_off", "prefill_time_ratio_prefill_over_off")
    # The analytic ratios follow from the shapes: traversal doubles the layers' work.
    assert 1.5 < r["prefill_flop_ratio_prefill_over_off"][0] <= 2.0
    assert r["decode_flop_ratio_prefill_over_off"][0] == 1.0


@pytest.mark.slow
def test_cpu_efficiency_smoke():
    r = run_bench("cpu_efficiency", "--size", "tiny", "--repeats", "3")
    assert_positive(r, "prefill_gflops_float32", "prefill_gflops_bfloat16", "matmul_square_gflops_float32",
                    "prefill_over_matmul_float32", "prefill_over_matmul_bfloat16")


@pytest.mark.slow
def test_caption_pipeline_smoke():
    r = run_bench("caption_pipeline", "--size", "tiny")
    assert_positive(r, "job_images_per_s_end_to_end", "bare_images_per_s_end_to_end", "job_over_bare_end_to_end",
                    "job_startup_ray_init_s", "batched_8_over_batch_1")
    assert r["job_over_bare_end_to_end"][0] < 5  # both captioned the same rows with equal tokens


@pytest.mark.slow
def test_train_step_smoke():
    r = run_bench("train_step", "--size", "tiny", "--steps", "12")
    assert_positive(r, "job_tokens_per_s_as_reported", "bare_tokens_per_s_loop", "job_over_bare_end_to_end",
                    "job_wall_s")
    assert 0 <= r["bare_data_wait_fraction"][0] < 1


@pytest.mark.slow
def test_digits_ablation_smoke():
    r = run_bench("digits_ablation", "--size", "tiny", "--steps", "6", "--seeds", "2")
    for mode in ("full", "off"):
        assert 0 <= r[f"accuracy_{mode}_mean"][0] <= 1
        assert r[f"final_loss_{mode}_mean"][0] > 0
    assert 0 <= r["seeds_where_full_beats_off"][0] <= 2


@pytest.mark.slow
def test_gpu_bench_runs_on_cpu_with_tiny_shape():
    r = run_bench("gpu_bench", "--device", "cpu", "--shapes", "tiny", "--batches", "1,2", "--new-tokens", "3")
    assert_positive(r, "tiny_b2_full_images_per_s", "tiny_b1_prefill_off_tflops", "tiny_b2_prefill_over_off_images_per_s")


def test_gpu_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu.sh")], check=True)


@pytest.mark.parametrize("mode", ["off", "full"])
def test_gpu_model_cached_decoding_equals_recomputation(mode):
    from bench.gpu_model import SHAPES, TroLShaped

    torch.manual_seed(0)
    model = TroLShaped(SHAPES["tiny"]).eval()
    v = model.shape.vision
    pixels = torch.randn(2 * v.tiles, 3, v.image_size, v.image_size)
    text = torch.randint(0, model.shape.lm.vocab, (2, model.shape.text_tokens))
    generated = model.caption(pixels, text, 4, mode)
    with torch.inference_mode():
        prompt = model.prompt_embeddings(pixels, text)
        for step in range(1, 4):
            x = torch.cat([prompt, model.lm.embed(generated[:, :step])], dim=1)
            logits = model.lm(x, model.lm.new_caches(2, x.shape[1], mode, x), mode)
            assert torch.equal(logits.argmax(-1), generated[:, step])
