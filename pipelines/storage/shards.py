"""Finding Parquet shards: a glob, a folder/prefix (every *.parquet below it), or one file."""

from __future__ import annotations

import posixpath
from collections.abc import Callable

from .store import Location, Storage, StorageError, glob_to_regex, is_glob, parse_uri


def find_shards(uri: str, storage: Storage) -> tuple[Location, list[Location], Callable[[str], bool]]:
    """(base, shards sorted by path, selects): `selects(rel)` tells whether a file at
    base/rel would be taken as input. Raises StorageError when the location is not there."""
    if is_glob(uri):
        cut = min(uri.find(c) for c in "*?[" if c in uri)
        head = uri[:cut].rsplit("/", 1)[0] if "/" in uri[:cut] else "."
        base = parse_uri(head)
        rx = glob_to_regex(uri[len(head) :].lstrip("/"))
        found = [f for f in storage.list_files(base) if rx.match(posixpath.relpath(f.path, base.path))]
        return base, found, lambda rel: bool(rx.match(rel))
    loc = parse_uri(uri.rstrip("/") if uri != "/" else uri)
    if storage.is_dir(loc):

        def selects(rel: str) -> bool:  # Hive/Spark convention: skip _SUCCESS, _temporary/, .crc
            return rel.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in rel.split("/"))

        found = [f for f in storage.list_files(loc) if selects(posixpath.relpath(f.path, loc.path))]
        return loc, found, selects
    if loc.path.endswith(".parquet") and storage.exists(loc):
        return Location(loc.scheme, posixpath.dirname(loc.path)), [loc], lambda rel: False
    raise StorageError(f"nothing found at {loc.uri}; give a folder/prefix, a .parquet file or a glob")
