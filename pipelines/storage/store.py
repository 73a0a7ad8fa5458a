"""One place that turns a location (s3://bucket/key, /local/path, file:///path) into bytes.

Everything that reads or writes job data goes through `Storage`: listings, small objects
(stats, summaries), Parquet footers, atomic whole-object writes and model downloads.

Credentials: only the standard AWS chain (AWS_* variables, shared config/credential files,
profiles, instance roles). The driver resolves them once; static keys (environment or
profile files) are then carried inside `Storage` to Ray workers, because a worker process
is started by its node's raylet and does not see variables exported in the driver's shell
(for example under `ray job submit`, or in a test that sets them after Ray started).
Role-based credentials are left for each node to resolve itself, since they rotate.
Secrets never appear in a repr, an error message or a log line.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .errors import (NotFoundError, StorageError, TransientStorageError, describe_error,  # noqa: F401
                             is_transient, with_retries)

GLOB_CHARS = "*?["
# Credential-chain methods whose keys do not rotate: safe to resolve once on the driver.
_STATIC_METHODS = {"env", "shared-credentials-file", "config-file", "explicit", "boto-config"}
@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Location:
    """A parsed URI: `scheme` is "s3" or "file"; `path` is bucket/key or an absolute path."""

    scheme: str
    path: str

    @property
    def uri(self) -> str:
        return f"s3://{self.path}" if self.scheme == "s3" else self.path

    def join(self, *parts: str) -> Location:
        return Location(self.scheme, posixpath.join(self.path.rstrip("/"), *parts))


def parse_uri(uri: str) -> Location:
    """s3://bucket/key stays remote; file:// and plain paths become absolute local paths."""
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError("empty location; give an s3://bucket/prefix URI or a local path")
    uri = uri.strip()
    if uri.startswith("s3://"):
        path = uri[len("s3://") :]
        bucket = path.split("/", 1)[0]
        if len(bucket) < 3:
            raise StorageError(f"{uri!r}: the bucket name is missing or too short")
        return Location("s3", path)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri):
        scheme = uri.split("://", 1)[0]
        raise StorageError(f"{uri!r}: scheme {scheme}:// is not supported; use s3:// or a local path")
    return Location("file", os.path.abspath(os.path.expanduser(uri)))


def is_glob(uri: str) -> bool:
    return any(c in uri for c in GLOB_CHARS)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """`**` crosses folders, `*` and `?` stay inside one path segment (unlike fnmatch)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class FileIdentity:
    size: int
    version: str  # "etag:..." on S3, "mtime:<ns>" locally


_clients: dict[Any, Any] = {}
_clients_lock = threading.Lock()


@dataclass(frozen=True)
class Storage:
    """How to reach S3 (endpoint, region, optional frozen credentials). Picklable for Ray."""

    endpoint_url: str | None = None
    region: str | None = None
    credentials: S3Credentials | None = None

    @classmethod
    def from_environment(cls, endpoint_url: str | None = None, region: str | None = None) -> Storage:
        """Spec values win; otherwise the standard AWS variables and profile decide."""
        import boto3

        endpoint = (
            endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
        )
        if endpoint and not re.match(r"^https?://[^/\s]+/?$", endpoint):
            raise StorageError(
                f"endpoint {endpoint!r} is not of the form http(s)://host[:port]; fix storage.endpoint_url"
            )
        session = boto3.Session()
        region = (
            region
            or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION")
            or session.region_name
            or "us-east-1"
        )
        creds = None
        found = session.get_credentials()
        if found is not None and getattr(found, "method", None) in _STATIC_METHODS:
            frozen = found.get_frozen_credentials()
            creds = S3Credentials(frozen.access_key, frozen.secret_key, frozen.token)
        return cls(endpoint.rstrip("/") if endpoint else None, region, creds)

    # --- clients --------------------------------------------------------------------------

    def s3_client(self) -> Any:
        """A boto3 client, one per process and settings (clients are thread-safe)."""
        with _clients_lock:
            client = _clients.get(self)
            if client is None:
                import boto3
                from botocore.config import Config

                kwargs: dict[str, Any] = {"region_name": self.region}
                if self.endpoint_url:
                    kwargs["endpoint_url"] = self.endpoint_url
                if self.credentials:
                    kwargs["aws_access_key_id"] = self.credentials.access_key
                    kwargs["aws_secret_access_key"] = self.credentials.secret_key
                    kwargs["aws_session_token"] = self.credentials.token
                # Path-style addressing: custom endpoints (SeaweedFS, MinIO) have no bucket DNS.
                style = "path" if self.endpoint_url else "auto"
                config = Config(s3={"addressing_style": style}, retries={"max_attempts": 5, "mode": "standard"})
                client = boto3.session.Session().client("s3", config=config, **kwargs)
                _clients[self] = client
            return client

    def filesystem(self, loc: Location) -> pafs.FileSystem:
        if loc.scheme == "file":
            return pafs.LocalFileSystem()
        kwargs: dict[str, Any] = {"region": self.region}
        if self.endpoint_url:
            parsed = urlparse(self.endpoint_url)
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        if self.credentials:
            kwargs["access_key"] = self.credentials.access_key
            kwargs["secret_key"] = self.credentials.secret_key
            kwargs["session_token"] = self.credentials.token
        return pafs.S3FileSystem(**kwargs)

    # --- listing --------------------------------------------------------------------------

    def list_files(self, loc: Location) -> list[Location]:
        """Every file under a folder/prefix, recursively, sorted."""
        if loc.scheme == "file":
            if os.path.isfile(loc.path):
                return [loc]
            out = []
            for root, dirs, files in os.walk(loc.path):
                dirs.sort()
                out.extend(Location("file", os.path.join(root, f)) for f in files)
            return sorted(out, key=lambda x: x.path)
        bucket, _, prefix = loc.path.partition("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        try:
            pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
        except Exception as exc:
            raise describe_error(exc, f"listing {loc.uri}") from None
        return sorted((Location("s3", f"{bucket}/{k}") for k in keys if not k.endswith("/")), key=lambda x: x.path)

    def exists(self, loc: Location) -> bool:
        if loc.scheme == "file":
            return os.path.exists(loc.path)
        bucket, _, key = loc.path.partition("/")
        try:
            self.s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            err = describe_error(exc, f"checking {loc.uri}")
            if isinstance(err, NotFoundError):
                return False
            raise err from None

    def is_dir(self, loc: Location) -> bool:
        """Local folder, or an S3 prefix holding at least one object."""
        if loc.scheme == "file":
            return os.path.isdir(loc.path)
        bucket, _, prefix = loc.path.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        try:
            resp = self.s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
        except Exception as exc:
            raise describe_error(exc, f"listing {loc.uri}") from None
        return bool(resp.get("KeyCount", 0))

    # --- whole objects --------------------------------------------------------------------

    def read_bytes(self, loc: Location) -> bytes:
        try:
            if loc.scheme == "file":
                with open(loc.path, "rb") as f:
                    return f.read()
            bucket, _, key = loc.path.partition("/")
            return self.s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise describe_error(exc, f"reading {loc.uri}") from None

    def write_bytes(self, loc: Location, data: bytes) -> None:
        """All-or-nothing: one S3 PUT, or a same-folder temp file renamed into place."""
        try:
            if loc.scheme == "file":
                os.makedirs(os.path.dirname(loc.path), exist_ok=True)
                tmp = f"{loc.path}.tmp-{uuid.uuid4().hex}"
                try:
                    with open(tmp, "wb") as f:
                        f.write(data)
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, loc.path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                return
            bucket, _, key = loc.path.partition("/")
            self.s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise describe_error(exc, f"writing {loc.uri}") from None

    def stat(self, loc: Location) -> FileIdentity:
        """Size and version (S3 ETag, or local mtime in ns) of one object: what identifies
        its contents cheaply, so a replaced input is noticed."""
        try:
            if loc.scheme == "file":
                st = os.stat(loc.path)
                return FileIdentity(int(st.st_size), f"mtime:{st.st_mtime_ns}")
            bucket, _, key = loc.path.partition("/")
            head = self.s3_client().head_object(Bucket=bucket, Key=key)
            return FileIdentity(int(head["ContentLength"]), f"etag:{str(head.get('ETag', '')).strip(chr(34))}")
        except Exception as exc:
            raise describe_error(exc, f"checking {loc.uri}") from None

    def delete(self, loc: Location) -> None:
        """Remove one object; a missing one is fine."""
        try:
            if loc.scheme == "file":
                if os.path.exists(loc.path):
                    os.unlink(loc.path)
                return
            bucket, _, key = loc.path.partition("/")
            self.s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise describe_error(exc, f"deleting {loc.uri}") from None

    def read_json(self, loc: Location) -> Any:
        return json.loads(self.read_bytes(loc))

    def write_json(self, loc: Location, obj: Any) -> None:
        self.write_bytes(loc, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def parquet_metadata(self, loc: Location) -> pq.FileMetaData:
        """The footer only (row count, schema): a few small ranged reads, not the data."""
        try:
            with self.filesystem(loc).open_input_file(loc.path) as f:
                return pq.ParquetFile(f).metadata
        except Exception as exc:
            raise describe_error(exc, f"reading the Parquet footer of {loc.uri}") from None

    # --- folders --------------------------------------------------------------------------

    def download_folder(
        self, loc: Location, dest: str, keep: Callable[[str], bool] = lambda rel: True, threads: int = 8
    ) -> list[str]:
        """Copy every file under `loc` whose relative name passes `keep` into `dest`."""
        files = [(f, posixpath.relpath(f.path, loc.path.rstrip("/"))) for f in self.list_files(loc)]
        files = [(f, rel) for f, rel in files if keep(rel)]
        if not files:
            raise StorageError(f"{loc.uri}: no files to download")

        def fetch(item: tuple[Location, str]) -> str:
            src, rel = item
            target = os.path.join(dest, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if src.scheme == "file":
                with open(src.path, "rb") as fi, open(target, "wb") as fo:
                    while chunk := fi.read(1 << 22):
                        fo.write(chunk)
            else:
                bucket, _, key = src.path.partition("/")
                try:
                    self.s3_client().download_file(bucket, key, target)
                except Exception as exc:
                    raise describe_error(exc, f"downloading {src.uri}") from None
            return rel

        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(fetch, files))

    def listing_signature(self, loc: Location) -> list[tuple[str, int, str]]:
        """(name, size, etag) of every object under an S3 prefix: identifies its contents."""
        bucket, _, prefix = loc.path.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        try:
            pages = self.s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return sorted(
                (o["Key"][len(prefix) :], int(o["Size"]), str(o.get("ETag", "")))
                for page in pages
                for o in page.get("Contents", [])
            )
        except Exception as exc:
            raise describe_error(exc, f"listing {loc.uri}") from None


def parquet_bytes(table: Any) -> bytes:
    """Serialize a table to Parquet in memory, so it can be written in one PUT."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
