"""Fine-tune a TroL model with Ray Train (DDP or FSDP, CPU or GPU workers).

    python -m jobs.finetune SPEC.yaml [--set key=value ...] [--address ADDR] [--stall-after SECONDS]
    ray job submit --working-dir . -- python -m jobs.finetune SPEC.yaml

Rerunning the same spec (same output + name) resumes from its last checkpoint.
Exit status: 0 trained (and evaluated, with an `evaluate:` section), 1 training or the
evaluation at its end failed (a trained model stays saved; a rerun redoes the evaluation),
2 bad spec.
"""

from __future__ import annotations

import logging
import sys

from jobs.job_args import spec_job_parser
from jobs.ray_session import ensure_ray
from pipelines.specs import FinetuneSpec, SpecError, load_spec


def main(argv: list[str] | None = None) -> int:
    parser = spec_job_parser("finetune", __doc__, "jobs/examples/finetune_digits.yaml")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.evaluate.after_training import format_evaluation
    from pipelines.finetune import format_finetune_summary, run_finetune
    from pipelines.storage import parse_uri

    try:
        spec = load_spec(FinetuneSpec, args.spec, args.overrides)
        print(f"finetune: running on {ensure_ray(args.address).describe()}", flush=True)
        summary = run_finetune(spec, stall_after_s=args.stall_after)
    except SpecError as exc:
        print(f"finetune: spec error: {exc}", file=sys.stderr)
        return 2
    print(format_finetune_summary(summary), flush=True)
    if summary.get("evaluation"):
        print(format_evaluation(summary), flush=True)
    run_dir = parse_uri(spec.output).join(spec.name).uri
    mlflow = spec.tracking.mlflow
    tracked = [name for name, on in (("mlruns/", mlflow is not None and not mlflow.tracking_uri),
                                     ("tensorboard/", spec.tracking.tensorboard)) if on]
    print(f"finetune: done; outputs in {run_dir} (model/, checkpoint_*/, loss_curve.png, training_summary.json"
          + "".join(f", {t}" for t in tracked) + ")", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
