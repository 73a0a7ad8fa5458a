"""Evaluating a TroL on benchmark sets: prompts, scorers and metrics as pure functions (no
Ray, no model), and the job that runs generation through the caption processor.

- `choices`: multiple-choice prompts, circular rotations, parsing a letter from free text.
- `answers`: yes/no parsing, VQA-style normalised exact match, relaxed numeric accuracy.
- `scoring`: one row's (parsed answer, correct) for each benchmark kind.
- `metrics`: overall and per-category metrics (POPE's counts, MME's acc + acc+, circular).
- `report`: metrics.md tables and side-by-side comparisons of two runs.
- `spec` / `job`: the `python -m jobs.evaluate` spec and run (these two import Ray's side).

This package's __init__ imports nothing, so pipelines.specs can take the benchmark spec
from `benchmark_spec` without a cycle.
"""
