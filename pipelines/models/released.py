"""Released TroL checkpoints (BK-Lee/TroL-1.8B, -3.8B, -7B) named directly as a job's model:
converted once per node into a cache folder and reused by every actor and later run.

The cache folder's name holds a digest of the source's file listing (names, sizes, mtimes),
so a changed source converts again; a file lock lets one process convert while the others
on the node wait, and the folder appears only when complete.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

GATES_FILE = "trol_gating.pt"
_RELEASED_HUB_ID = re.compile(r"^BK-Lee/TroL-(1\.8B|3\.8B|7B)$")


def is_released_folder(path: str) -> bool:
    """A released layout: the TroL gates as a separate file and no TroL processor files."""
    folder = Path(path)
    return (folder / GATES_FILE).is_file() and not (folder / "processor_config.json").is_file()


def is_released_hub_id(model: str) -> bool:
    return bool(_RELEASED_HUB_ID.match(model))


def _listing_digest(source: Path) -> str:
    entries = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in source.iterdir() if p.is_file())
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def converted_folder(model: str, cache_dir: str | None, traversal: str = "prefill") -> str:
    """The converted TroL folder for a released folder or hub id, converting it if needed."""
    from trol.convert import convert_released, resolve_source

    source = resolve_source(model)  # a hub id is downloaded (or found in the hub cache) here
    root = Path(cache_dir or Path.home() / ".cache" / "trol-ray" / "models")
    target = root / f"converted-{source.name}-{_listing_digest(source)}-{traversal}"
    if (target / "config.json").is_file():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():  # nobody finished it while we waited
            log.info("converting released checkpoint %s into %s (once per node)", model, target)
            report = convert_released(str(source), str(target), traversal=traversal)
            log.info("converted %s: %s tensors, %.1f GB in %ss", model, report["written_tensors"],
                     report["bytes"] / 1e9, report["seconds"])
    os.utime(target)  # most recently used: what a cache cleaner should keep
    return str(target)
