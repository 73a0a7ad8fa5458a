"""Finding Parquet shards: a glob, a folder/prefix (every *.parquet below it), or one file."""

from __future__ import annotations

import posixpath

from .storage import Location, Storage, StorageError, glob_to_regex, is_glob, parse_uri


def _hidden(base: Location, f: Location) -> bool:
    # Hive/Spark convention: _SUCCESS, _SUMMARY.json, _temporary/, .crc are not data.
    return any(p.startswith(("_", ".")) for p in posixpath.relpath(f.path, base.path).split("/"))


def find_shards(uri: str, storage: Storage) -> tuple[Location, list[Location]]:
    """(base, shards) sorted by path. Raises StorageError when nothing is there."""
    if is_glob(uri):
        cut = min(uri.find(c) for c in "*?[" if c in uri)
        head = uri[:cut].rsplit("/", 1)[0] if "/" in uri[:cut] else "."
        base = parse_uri(head)
        rx = glob_to_regex(uri[len(head) :].lstrip("/"))
        return base, [f for f in storage.list_files(base) if rx.match(posixpath.relpath(f.path, base.path))]
    loc = parse_uri(uri.rstrip("/") if uri != "/" else uri)
    if storage.is_dir(loc):
        return loc, [f for f in storage.list_files(loc) if f.path.endswith(".parquet") and not _hidden(loc, f)]
    if loc.path.endswith(".parquet") and storage.exists(loc):
        return Location(loc.scheme, posixpath.dirname(loc.path)), [loc]
    raise StorageError(f"nothing found at {loc.uri}; give a folder/prefix, a .parquet file or a glob")
