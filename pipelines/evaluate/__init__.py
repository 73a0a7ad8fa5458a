"""Evaluating a TroL on benchmark sets: prompts, scorers and metrics as pure functions (no
Ray, no model), and the job that answers the questions through the caption processor.

- `choices`: multiple-choice prompts, circular rotations, reading a letter from free text.
- `answers`: yes/no parsing, VQA-style normalised exact match, relaxed numeric accuracy.
- `rows`: an input row → the questions asked; a reply → (parsed answer, correct).
- `metrics`: overall and per-category metrics (POPE's counts, MME's acc + acc+, circular).
- `report`: metrics.md, and two runs side by side with deltas.
- `benchmark_spec` / `spec`: one benchmark; the job's spec (`python -m jobs.evaluate`).
- `plan` / `results` / `job`: check the spec and read shards into questions; score and
  write the outputs; the Ray Data pipeline that ties them to the caption processor.
- `after_training`: fine-tuning's `evaluate:` section.

This __init__ imports nothing, so pipelines.specs can take `benchmark_spec` without a cycle.
"""
