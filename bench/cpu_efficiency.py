"""How close a prefill comes to the machine's own matmul speed: achieved FLOP/s of a TroL
prefill (analytic FLOPs ÷ time) over the FLOP/s of a plain dense matmul at the same dtype
and threads, measured interleaved in this process. On a GPU, also MFU against the
device's datasheet peak.

    python -m bench.cpu_efficiency [--size tiny|small] [--device cpu|cuda] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch

from trol import TroLCache

from .common import interleaved, median, note, parse_args, print_machine, ratio, result
from .models import SHAPES, build_model, prefill_flops

# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s, from the vendors' datasheets.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100": 989.0,
                   "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}
# (prefill tokens, reference square matmul side, repeats)
WORKLOAD = {"tiny": (64, 256, 5), "small": (1024, 2048, 5)}


def gpu_peak_tflops(name: str) -> float | None:
    for key, peak in GPU_PEAK_TFLOPS.items():  # the more specific names come first
        if key in name:
            return peak
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtypes", default=None, help="comma-separated; default float32,bfloat16 on CPU, bfloat16 on GPU")
    parser.add_argument("--mode", default="prefill", choices=["off", "prefill", "full"], help="traversal mode")
    parser.add_argument("--peak-tflops", type=float, default=None, help="GPU peak to compute MFU against")
    parser.add_argument("--profile", action="store_true", help="print where a prefill's time goes, per op")


def matmul_runner(m: int, k: int, n: int, dtype: torch.dtype, device: str):
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return (lambda: torch.mm(a, b)), 2 * m * k * n


def profile_prefill(run, top: int = 12) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    for e in events[:top]:
        note(f"profile {e.key}: {100 * e.self_cpu_time_total / total:.1f}% self time, {e.count} calls")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], add_arguments, argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch")
    dtypes = (args.dtypes or ("float32,bfloat16" if device == "cpu" else "bfloat16")).split(",")
    tokens, side, repeats = WORKLOAD[args.size]
    repeats = args.repeats or repeats
    print_machine(device, ",".join(dtypes), size=args.size, mode=args.mode)
    shape = SHAPES[args.size]
    started = time.perf_counter()
    base, _ = build_model(args.size, traversal=args.mode)
    result("startup_model_build_s", time.perf_counter() - started, "s")
    text = base.config.text_config
    flops = prefill_flops(text, 1, tokens, args.mode)
    note(f"prefill of {tokens} tokens, traversal {args.mode}: {flops / 1e9:.2f} GFLOP analytic; references: "
         f"({tokens}×{shape.hidden})@({shape.hidden}×{shape.intermediate}) and {side}³ matmuls; median of {repeats}")
    ids = torch.randint(8, text.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.masked_fill(ids == base.config.image_token_id, 8).to(device)
    for name in dtypes:
        dtype = getattr(torch, name)
        model = base.to(device=device, dtype=dtype)

        def prefill() -> None:
            model(input_ids=ids, cache=TroLCache(config=text), use_cache=True, logits_to_keep=1)

        mlp_mm, mlp_flops = matmul_runner(tokens, shape.hidden, shape.intermediate, dtype, device)
        square_mm, square_flops = matmul_runner(side, side, side, dtype, device)
        with torch.inference_mode():
            times = interleaved({"prefill": prefill, "mlp_matmul": mlp_mm, "square_matmul": square_mm},
                                repeats, device=device)
            if args.profile and device == "cpu":
                profile_prefill(prefill)
        achieved = flops / median(times["prefill"])
        mlp_rate = mlp_flops / median(times["mlp_matmul"])
        square_rate = square_flops / median(times["square_matmul"])
        reference = max(mlp_rate, square_rate)
        result(f"prefill_gflops_{name}", achieved / 1e9, "GFLOP/s")
        result(f"matmul_model_shape_gflops_{name}", mlp_rate / 1e9, "GFLOP/s")
        result(f"matmul_square_gflops_{name}", square_rate / 1e9, "GFLOP/s")
        result(f"prefill_over_matmul_{name}", ratio(achieved, reference), "x")
        if device == "cuda":
            peak = args.peak_tflops or gpu_peak_tflops(torch.cuda.get_device_name())
            if peak and dtype in (torch.bfloat16, torch.float16):
                result(f"prefill_mfu_{name}", achieved / (peak * 1e12), "x")
            else:
                note(f"no datasheet peak known for {torch.cuda.get_device_name()} at {name}; pass --peak-tflops")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
