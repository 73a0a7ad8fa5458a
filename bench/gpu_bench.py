"""Prefill MFU and captioning images/s of random-weight TroL-1.8B / TroL-3.8B shapes for
traversal off / prefill / full at several batch sizes. Torch only (see bench/gpu_model.py);
run by bench/gpu.sh on a GPU machine, or on a CPU with --shapes tiny to check it works.

    python -m bench.gpu_bench [--device cuda] [--shapes trol-1.8b,trol-3.8b] [--batches 1,16,64]
"""

from __future__ import annotations

import argparse
import time

import torch

from .common import note, print_machine, ratio, result, sync
from .gpu_model import HAS_FLASH_ATTN, SHAPES, TroLShaped, lm_prefill_flops, parameter_count

MODES = ("off", "prefill", "full")
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="trol-1.8b,trol-3.8b")
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--budget-s", type=float, default=225.0, help="skip what would start after this")
    parser.add_argument("--peak-tflops", type=float, default=None)
    return parser.parse_args(argv)


def peak_flops(device: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((p * 1e12 for key, p in GPU_PEAK_TFLOPS.items() if key in name), None)


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def bench_shape(name: str, args: argparse.Namespace, dtype: torch.dtype, started: float, peak: float | None) -> None:
    shape, device = SHAPES[name], args.device
    t0 = time.perf_counter()
    with torch.device(device):
        model = TroLShaped(shape).to(dtype).eval()
    sync(device)
    result(f"{name}_startup_build_s", time.perf_counter() - t0, "s")
    note(f"{name}: {parameter_count(model) / 1e9:.2f}B parameters, {shape.image_tokens} image + "
         f"{shape.text_tokens} text tokens, {args.new_tokens} new tokens")
    prompt_tokens = shape.image_tokens + shape.text_tokens
    v = shape.vision
    for batch in [int(b) for b in args.batches.split(",")]:
        if time.perf_counter() - started > args.budget_s:
            note(f"{name} batch {batch}: skipped, the time budget is spent")
            continue
        gen = torch.Generator(device=device).manual_seed(batch)
        pixels = torch.randn(batch * v.tiles, 3, v.image_size, v.image_size, device=device, generator=gen).to(dtype)
        text = torch.randint(0, shape.lm.vocab, (batch, shape.text_tokens), device=device, generator=gen)
        try:
            with torch.inference_mode():
                x = model.prompt_embeddings(pixels, text)
                prefill_s = {}
                for mode in ("off", "prefill"):  # `full` prefills exactly as `prefill` does
                    def run(mode=mode):
                        model.lm(x, model.lm.new_caches(batch, prompt_tokens, mode, x), mode)
                    run()  # warm-up (kernel selection, allocator)
                    prefill_s[mode] = min(timed(run, device) for _ in range(2))
                    flops = lm_prefill_flops(shape.lm, batch, prompt_tokens, traverses=mode != "off")
                    achieved = flops / prefill_s[mode]
                    label = "traversed" if mode != "off" else "off"
                    result(f"{name}_b{batch}_prefill_{label}_tflops", achieved / 1e12, "TFLOP/s")
                    if peak:
                        result(f"{name}_b{batch}_prefill_{label}_mfu", achieved / peak, "x")
                del x
                rates = {}
                for mode in MODES:
                    model.caption(pixels, text, 2, mode)  # warm-up of the decode path
                    seconds = timed(lambda: model.caption(pixels, text, args.new_tokens, mode), device)
                    rates[mode] = batch / seconds
                    result(f"{name}_b{batch}_{mode}_images_per_s", rates[mode], "images/s")
                for mode in ("prefill", "full"):
                    result(f"{name}_b{batch}_{mode}_over_off_images_per_s", ratio(rates[mode], rates["off"]), "x")
        except torch.OutOfMemoryError:
            note(f"{name} batch {batch}: out of device memory (the full-mode cache doubles the KV cache)")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    del model


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    attention = "flash_attn" if HAS_FLASH_ATTN and args.device == "cuda" else "sdpa"
    print_machine(args.device, str(dtype).removeprefix("torch."), attention=attention)
    peak = peak_flops(args.device, args.peak_tflops)
    if args.device == "cuda" and not peak:
        note(f"no datasheet peak for {torch.cuda.get_device_name()}: pass --peak-tflops for MFU")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    for name in args.shapes.split(","):
        bench_shape(name, args, dtype, started, peak)
    result("total_wall_s", time.perf_counter() - started, "s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
