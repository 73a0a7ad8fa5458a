"""Fine-tune a TroL model with Ray Train.

    python -m jobs.finetune SPEC.yaml [--set key=value ...]
    ray job submit --working-dir . -- python -m jobs.finetune SPEC.yaml

Rerunning the same spec (same output + name) resumes from its last checkpoint.
Exit status: 0 trained (and evaluated, with an `evaluate:` section), 1 training or the
evaluation at its end failed (a trained model stays saved; a rerun redoes the evaluation),
2 bad spec.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.ray_session import ensure_ray
from pipelines.specs import FinetuneSpec, SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="YAML fine-tuning spec (see jobs/examples/finetune_digits.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set max_steps=200 --set lora.r=8")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.evaluate.after_training import format_evaluation
    from pipelines.finetune import format_finetune_summary, run_finetune
    from pipelines.storage import parse_uri

    try:
        spec = load_spec(FinetuneSpec, args.spec, args.overrides)
        ensure_ray()
        summary = run_finetune(spec)
    except SpecError as exc:
        print(f"finetune: spec error: {exc}", file=sys.stderr)
        return 2
    print(format_finetune_summary(summary), flush=True)
    if summary.get("evaluation"):
        print(format_evaluation(summary), flush=True)
    run_dir = parse_uri(spec.output).join(spec.name).uri
    print(f"finetune: done; outputs in {run_dir} (model/, checkpoint_*/, loss_curve.png, training_summary.json)",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
