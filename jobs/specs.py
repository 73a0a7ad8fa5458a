"""The job specs live in pipelines.specs, beside what they configure (layers point down:
jobs → pipelines → trol). This name keeps `from jobs.specs import ...` working."""

from pipelines.specs import *  # noqa: F401,F403
from pipelines.specs import (CAPTION_COLUMNS, CaptionSpec, FinetuneSpec, GenerationSpec, LoraSpec,  # noqa: F401
                             SpecError, StorageSpec, apply_overrides, build_spec, format_validation_error,
                             load_spec, public_dump)
from pipelines.evaluate.spec import EvaluateSpec  # noqa: E402,F401
