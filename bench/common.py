"""What every benchmark shares: the command line, machine facts, RESULT lines and timing.

Every figure a script prints is a ratio (or a rate) of things measured in the same process,
with the variants interleaved so slow drift from other load hits them alike.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable

import torch

SIZES = ("tiny", "small")


def parse_args(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None) -> argparse.Namespace:
    prog = f"python -m {sys.modules['__main__'].__spec__.name}" if getattr(sys.modules["__main__"], "__spec__", None) else None
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--size", choices=SIZES, default="tiny",
                        help="tiny: a smoke run in seconds; small: ~85M parameters, compute-bound on CPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: every core torch sees)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (median is reported)")
    if add_arguments:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def print_machine(device: str = "cpu", dtype: str = "float32", **extra: object) -> None:
    """One MACHINE line of key=value facts (shell-quoted), so a figure always travels with
    what produced it."""
    facts: dict[str, object] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    flags = cpu_flags()
    facts["cpu_bf16"] = "amx" if "amx_bf16" in flags else ("avx512_bf16" if "avx512_bf16" in flags else "none")
    load = load_average()
    if load is not None:
        facts["load_1min_at_start"] = f"{load:.2f}"
    facts.update(extra)
    print("MACHINE " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in facts.items()), flush=True)


def result(name: str, value: float, unit: str) -> None:
    """`RESULT name=value unit`: the one line format every benchmark prints per figure."""
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:.4g}" if abs(value) < 1e6 else f"{value:.4e}"
    else:
        text = str(value)
    print(f"RESULT {name}={text} {unit}", flush=True)


def note(text: str) -> None:
    """Context that is not a figure (what was compared, why a figure is missing)."""
    print(f"# {text}", flush=True)


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else float("nan")


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                device: torch.device | str = "cpu", self_timed: bool = False) -> dict[str, list[float]]:
    """Seconds per call of each variant: warm-up calls first (not timed), then `repeats`
    rounds in which every variant runs once, starting from a different one each round so
    no variant always follows the same neighbour. With self_timed the variant returns its
    own seconds (to leave its set-up, e.g. building a KV cache, out of the figure)."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            start = time.perf_counter()
            own = variants[name]()
            sync(device)
            times[name].append(float(own) if self_timed else time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Half the range: a plain, honest error bar for a handful of repeats."""
    return (max(values) - min(values)) / 2 if values else float("nan")
