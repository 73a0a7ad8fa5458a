"""Data → the Parquet shards the jobs read (`python -m jobs.prepare`).

- `output`: what every source shares: the schemas, shard writing (atomic, size-capped),
  `_SUMMARY.json`, conversation normalising.
- `digits`: scikit-learn's digits as captioned train/test shards (and multiple-choice rows).
- `llava`: LLaVA-style JSON conversations and a folder of images.
- `benchmarks`: benchmark sets for the evaluate job (MMBench TSV, POPE/MME yes/no, LLaVA
  questions, held-out digits as multiple choice).
"""

from .output import (DEFAULT_DIGITS_SHARD_ROWS, DEFAULT_IMAGE_SIZE, DEFAULT_LLAVA_SHARD_ROWS, DEFAULT_TEST_FRACTION,
                     DIGIT_PROMPT, DIGIT_WORDS, DIGITS_SCHEMA, LLAVA_SCHEMA, SUMMARY_NAME, InvalidRecord,
                     PrepareError, normalize_conversations)

__all__ = [
    "DEFAULT_DIGITS_SHARD_ROWS", "DEFAULT_IMAGE_SIZE", "DEFAULT_LLAVA_SHARD_ROWS", "DEFAULT_TEST_FRACTION",
    "DIGITS_SCHEMA", "DIGIT_PROMPT", "DIGIT_WORDS", "InvalidRecord", "LLAVA_SCHEMA", "PrepareError", "SUMMARY_NAME",
    "normalize_conversations",
]
