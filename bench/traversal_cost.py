"""What traversal costs: prefill and per-token decode time for traversal off / prefill /
full on one model (the same weights; only the mode switches), beside the analytic FLOP ratio.

    python -m bench.traversal_cost [--size tiny|small] [--dtype float32|bfloat16]
"""

from __future__ import annotations

import time

import torch

from trol import TroLCache

from .common import interleaved, median, note, parse_args, print_machine, ratio, result, sync
from .models import SHAPES, build_model, decode_flops, parameter_count, prefill_flops

MODES = ("off", "prefill", "full")
# (prefill tokens, decode batch, decode context, decode steps, repeats)
WORKLOAD = {"tiny": (64, 2, 32, 8, 5), "small": (1024, 8, 128, 16, 5)}


def random_ids(batch: int, tokens: int, vocab: int, avoid: int, generator: torch.Generator) -> torch.Tensor:
    ids = torch.randint(8, vocab, (batch, tokens), generator=generator)
    return ids.masked_fill(ids == avoid, 8)  # an image token without pixels is an error


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], lambda p: p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default="float32"), argv)
    dtype = getattr(torch, args.dtype)
    tokens, batch, context, steps, repeats = WORKLOAD[args.size]
    repeats = args.repeats or repeats
    print_machine("cpu", args.dtype, size=args.size)
    started = time.perf_counter()
    model, _ = build_model(args.size)
    model = model.to(dtype)
    result("startup_model_build_s", time.perf_counter() - started, "s")
    text = model.config.text_config
    note(f"{SHAPES[args.size]}; {parameter_count(model) / 1e6:.1f}M parameters; prefill {tokens} tokens at "
         f"batch 1; decode batch {batch} after {context} tokens, {steps} steps; median of {repeats}")
    gen = torch.Generator().manual_seed(0)
    prompt = random_ids(1, tokens, text.vocab_size, model.config.image_token_id, gen)
    decode_prompt = random_ids(batch, context, text.vocab_size, model.config.image_token_id, gen)

    def prefill(mode: str):
        def run() -> None:
            model.set_traversal(mode)
            model(input_ids=prompt, cache=TroLCache(config=text), use_cache=True, logits_to_keep=1)
        return run

    def decode(mode: str):
        def run() -> float:
            model.set_traversal(mode)
            cache = TroLCache(config=text)
            out = model(input_ids=decode_prompt, cache=cache, use_cache=True, logits_to_keep=1)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            start = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=step_ids, cache=cache, use_cache=True, logits_to_keep=1)
                step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            sync("cpu")
            return (time.perf_counter() - start) / steps
        return run

    with torch.inference_mode():
        prefill_times = interleaved({m: prefill(m) for m in MODES}, repeats)
        decode_times = interleaved({m: decode(m) for m in MODES}, repeats, self_timed=True)

    base_prefill = median(prefill_times["off"])
    base_decode = median(decode_times["off"])
    for mode in MODES:
        result(f"prefill_ms_{mode}", 1e3 * median(prefill_times[mode]), "ms")
    for mode in MODES:
        result(f"decode_ms_per_token_{mode}", 1e3 * median(decode_times[mode]), "ms")
    for mode in ("prefill", "full"):
        flop_ratio = ratio(prefill_flops(text, 1, tokens, mode), prefill_flops(text, 1, tokens, "off"))
        result(f"prefill_time_ratio_{mode}_over_off", ratio(median(prefill_times[mode]), base_prefill), "x")
        result(f"prefill_flop_ratio_{mode}_over_off", flop_ratio, "x")
    for mode in ("prefill", "full"):
        # The context grows by one token per step; the middle step stands for the average.
        middle = context + steps // 2
        flop_ratio = ratio(decode_flops(text, batch, middle, mode), decode_flops(text, batch, middle, "off"))
        result(f"decode_time_ratio_{mode}_over_off", ratio(median(decode_times[mode]), base_decode), "x")
        result(f"decode_flop_ratio_{mode}_over_off", flop_ratio, "x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
