"""Bytes in and out: local folders and S3, and the data formats every job shares.

- `store`: `Storage` and `Location` (`parse_uri`): listings, reads, atomic writes,
  downloads, for s3:// and local paths alike.
- `errors`: storage failures as one safe line; which are transient; retries with backoff.
- `shards`: a folder, prefix, file or glob → the Parquet shards it names.
- `images`: any image cell (bytes, path, URL on storage) → a decoded image or an error.
- `pixels`: preprocessed pixel arrays packed into Arrow columns between stages.
"""

from .errors import NotFoundError, StorageError, TransientStorageError, describe_error, with_retries
from .store import FileIdentity, Location, Storage, glob_to_regex, is_glob, parquet_bytes, parse_uri

__all__ = [
    "FileIdentity", "Location", "NotFoundError", "Storage", "StorageError", "TransientStorageError", "describe_error",
    "glob_to_regex", "is_glob", "parquet_bytes", "parse_uri", "with_retries",
]
