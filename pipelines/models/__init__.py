"""Where a model comes from, for caption, fine-tuning and evaluation alike.

- `refs`: a model location (local, s3://, hub id, released TroL) checked on the driver
  (`resolve_model_ref`) and turned into files on each node (`materialize_model`,
  `load_processor`).
- `released`: released TroL checkpoints (BK-Lee/TroL-1.8B, -3.8B, -7B) converted once per
  node into a cache folder.
"""

from .refs import ModelRef, default_cache_dir, load_processor, materialize_model, resolve_model_ref

__all__ = ["ModelRef", "default_cache_dir", "load_processor", "materialize_model", "resolve_model_ref"]
