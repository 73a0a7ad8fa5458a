"""Does traversal help at equal size? The digits task trained with traversal `full` and
`off` from the same random start (the mixers' d + 1 parameters per layer exist in both; `off`
never uses them), same steps, data, optimizer and seeds; then held-out caption accuracy
(greedy, with the mode it was trained in) and final training loss, mean ± half-range over
seeds. Whichever way it comes out is the result.

    python -m bench.digits_ablation [--size tiny|small] [--seeds 3] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from .common import note, parse_args, print_machine, result, spread
from .models import SHAPES, save_model
from .train_loop import TrainSettings, caption_accuracy, train
from .train_step import prepare_digits

MODES = ("full", "off")
# (steps, seeds, held-out images scored); the model is always the tiny digits shape: the
# question is about the method, and 3 seeds × 2 modes must train in minutes on 2 cores.
WORKLOAD = {"tiny": (10, 2, 32), "small": (300, 3, 360)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--workdir", default=None)


def last_mean(values: list[float], count: int = 10) -> float:
    """The final loss as the mean of the last few steps: one batch's loss is noisy."""
    tail = values[-count:]
    return sum(tail) / len(tail)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__.split("\n\n")[0], add_arguments, argv)
    steps, seeds, scored = WORKLOAD[args.size]
    steps, seeds = args.steps or steps, args.seeds or seeds
    print_machine("cpu", "float32", size=args.size, steps=steps, seeds=seeds)
    note(f"{SHAPES['tiny']}; digits at 32 px, batch 16, lr 2e-3, {steps} steps; accuracy on {scored} held-out")
    accuracy: dict[str, list[float]] = {m: [] for m in MODES}
    loss: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-ablation-") as tmp:
        work = Path(args.workdir or tmp)
        data = work / "digits"
        prepare_digits(data, 32)
        for seed in range(seeds):
            # One random start per seed, shared by both modes: only traversal differs.
            model_dir = save_model("tiny", work / f"init-{seed}", traversal="full", seed=seed)
            for mode in MODES:
                started = time.perf_counter()
                run = train(model_dir, data / "train", TrainSettings(steps=steps, seed=seed, traversal=mode))
                acc = caption_accuracy(run.model, run.processor, data / "test", limit=scored)
                accuracy[mode].append(acc)
                loss[mode].append(last_mean(run.losses))
                note(f"seed {seed} {mode}: accuracy {acc:.3f}, final loss {loss[mode][-1]:.4f}, "
                     f"{time.perf_counter() - started:.0f} s")
    for mode in MODES:
        result(f"accuracy_{mode}_mean", statistics.mean(accuracy[mode]), "fraction")
        result(f"accuracy_{mode}_spread", spread(accuracy[mode]), "fraction")
        result(f"final_loss_{mode}_mean", statistics.mean(loss[mode]), "nats")
        result(f"final_loss_{mode}_spread", spread(loss[mode]), "nats")
    result("accuracy_full_minus_off", statistics.mean(accuracy["full"]) - statistics.mean(accuracy["off"]), "fraction")
    wins = sum(f > o for f, o in zip(accuracy["full"], accuracy["off"]))
    result("seeds_where_full_beats_off", wins, "seeds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
