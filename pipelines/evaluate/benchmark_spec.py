"""One benchmark of an evaluation: where its rows are, how they are asked and scored.

Used by the evaluate job's spec and by the fine-tuning spec (`evaluate:`), so it imports
nothing of pipelines.specs (which imports it)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Kind = Literal["multiple_choice", "yes_no", "short_answer", "numeric"]
KINDS: tuple[str, ...] = ("multiple_choice", "yes_no", "short_answer", "numeric")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class BenchmarkSpec(BaseModel):
    """A benchmark: Parquet shards with an image, `question`, `answer` and, for multiple
    choice, `choices` (a list) or option columns A, B, C, …; optionally `category`, `hint`,
    and an id column (`index`, else `id`)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(..., description="names the benchmark in metrics and predictions (letters, digits, _ . -)")
    data: str = Field(..., description="Parquet shards: folder/prefix, file or glob (s3:// or local)")
    kind: Kind = Field(..., description="multiple_choice | yes_no | short_answer | numeric")
    circular: bool = Field(False, description="multiple_choice: ask every rotation of the options (MMBench's "
                                              "CircularEval); a question is right only if every rotation is")
    mme_score: bool = Field(False, description="yes_no: also MME's score per category: acc + acc+ (both questions of "
                                               "an image right), in percent, summed over categories")
    instruction: str | None = Field(None, description="appended to each question; None: the kind's usual one, "
                                                      "'' for none")
    limit: int | None = Field(None, ge=1, description="score only the first N rows (in shard order)")
    image_column: str = "image"
    question_column: str = "question"
    answer_column: str = "answer"
    choices_column: str = Field("choices", description="a list of option texts; without it, columns A, B, C, …")
    category_column: str = "category"
    hint_column: str = "hint"
    id_column: str | None = Field(None, description="None: `index` if the shards have it, else `id`, else the row's place")
    image_key_column: str | None = Field(None, description="mme_score: the column naming each row's image; None: a "
                                                           "digest of the image bytes or path")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be letters, digits, '_', '.' or '-' (it names files and table rows)")
        return v

    @field_validator("data", "image_column", "question_column", "answer_column")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _options_fit_kind(self) -> BenchmarkSpec:
        if self.circular and self.kind != "multiple_choice":
            raise ValueError(f"circular applies to kind: multiple_choice, not {self.kind}")
        if self.mme_score and self.kind != "yes_no":
            raise ValueError(f"mme_score applies to kind: yes_no, not {self.kind}")
        if self.image_key_column and not self.mme_score:
            raise ValueError("image_key_column is only read with mme_score: true")
        return self


def check_unique_names(benchmarks: list[BenchmarkSpec]) -> list[BenchmarkSpec]:
    names = [b.name for b in benchmarks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"benchmark names must be unique; {', '.join(twice)} appears more than once")
    return benchmarks


class EvaluateAfterTraining(BaseModel):
    """The fine-tuning spec's `evaluate:` section: benchmarks scored at the end of a run,
    for the trained model and (compare_base) the base model; the metrics join
    training_summary.json, and each run's outputs go to output/name/evaluation/."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    benchmarks: list[BenchmarkSpec] = Field(..., min_length=1)
    compare_base: bool = Field(True, description="also evaluate base_model, so the summary shows what training changed")
    max_new_tokens: int = Field(16, ge=1, le=4096, description="tokens generated per answer")
    batch_size: int = Field(16, ge=1, le=4096, description="questions per generate() call")

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, v: list[BenchmarkSpec]) -> list[BenchmarkSpec]:
        return check_unique_names(v)
