"""pipelines.storage against the local filesystem and a real S3 server (SeaweedFS)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.storage import (
    Location,
    NotFoundError,
    Storage,
    StorageError,
    glob_to_regex,
    parquet_bytes,
    parse_uri,
)


def test_parse_uri_kinds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_uri("s3://bucket/a/b.parquet") == Location("s3", "bucket/a/b.parquet")
    assert parse_uri("file:///data/x") == Location("file", "/data/x")
    monkeypatch.chdir(tmp_path)
    assert parse_uri("rel/dir") == Location("file", str(tmp_path / "rel" / "dir"))
    assert parse_uri("s3://bucket/p").join("q", "r.json").uri == "s3://bucket/p/q/r.json"
    with pytest.raises(StorageError, match="gs:// is not supported"):
        parse_uri("gs://bucket/x")
    with pytest.raises(StorageError, match="bucket name"):
        parse_uri("s3://ab")
    with pytest.raises(StorageError, match="empty"):
        parse_uri("  ")


@pytest.mark.parametrize(
    ("pattern", "yes", "no"),
    [
        ("part-*.parquet", ["part-1.parquet"], ["sub/part-1.parquet", "part-1.json"]),
        ("**/*.parquet", ["a.parquet", "x/y/a.parquet"], ["a.json"]),
        ("d?/p[0-2].parquet", ["d1/p0.parquet"], ["d12/p0.parquet", "d1/p3.parquet"]),
        ("p[!0].parquet", ["p1.parquet"], ["p0.parquet"]),
    ],
)
def test_glob_segments(pattern: str, yes: list[str], no: list[str]) -> None:
    rx = glob_to_regex(pattern)
    assert all(rx.match(p) for p in yes)
    assert not any(rx.match(p) for p in no)


def test_local_roundtrip_is_atomic(tmp_path: Path) -> None:
    st = Storage()
    target = parse_uri(str(tmp_path / "out" / "deep" / "obj.bin"))
    st.write_bytes(target, b"first")
    st.write_bytes(target, b"second")  # replaces in one rename
    assert st.read_bytes(target) == b"second"
    assert sorted(os.listdir(tmp_path / "out" / "deep")) == ["obj.bin"]  # no temp files left
    st.write_json(parse_uri(str(tmp_path / "out" / "s.json")), {"a": 1})
    assert st.read_json(parse_uri(str(tmp_path / "out" / "s.json"))) == {"a": 1}
    listed = [loc.path for loc in st.list_files(parse_uri(str(tmp_path / "out")))]
    assert listed == [str(tmp_path / "out" / "deep" / "obj.bin"), str(tmp_path / "out" / "s.json")]
    assert st.exists(target) and not st.exists(parse_uri(str(tmp_path / "missing")))
    with pytest.raises(NotFoundError):
        st.read_bytes(parse_uri(str(tmp_path / "missing")))


def test_parquet_footer_only(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(parquet_bytes(pa.table({"x": list(range(7))})))
    meta = Storage().parquet_metadata(parse_uri(str(path)))
    assert meta.num_rows == 7 and meta.schema.to_arrow_schema().names == ["x"]


def test_credentials_are_frozen_but_never_shown(s3_env) -> None:
    st = Storage.from_environment(s3_env.endpoint_url)
    assert st.credentials is not None and st.credentials.access_key == s3_env.access_key
    assert s3_env.secret_key not in repr(st)
    assert s3_env.secret_key not in repr(st.filesystem(parse_uri("s3://bucket/x")))
    # Shipped to Ray workers inside Storage, so workers need no AWS_* of their own.
    assert pickle.loads(pickle.dumps(st)) == st


def test_endpoint_from_standard_variable(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint_url)
    st = Storage.from_environment()
    assert st.endpoint_url == s3_env.endpoint_url and st.region == "us-east-1"
    with pytest.raises(StorageError, match="endpoint_url"):
        Storage.from_environment("127.0.0.1:9000")


def test_s3_roundtrip(s3_env, make_bucket) -> None:
    bucket = make_bucket()
    st = Storage.from_environment(s3_env.endpoint_url)
    root = parse_uri(f"s3://{bucket}/data")
    st.write_bytes(root.join("a", "one.bin"), b"1")
    st.write_json(root.join("b.json"), {"k": [1, 2]})
    table = pa.table({"id": ["x", "y", "z"]})
    st.write_bytes(root.join("t.parquet"), parquet_bytes(table))
    assert [loc.uri for loc in st.list_files(root)] == [
        f"s3://{bucket}/data/a/one.bin", f"s3://{bucket}/data/b.json", f"s3://{bucket}/data/t.parquet"
    ]
    # A prefix match must respect folder boundaries: data2/ is not under data/.
    st.write_bytes(parse_uri(f"s3://{bucket}/data2/other.bin"), b"2")
    assert len(st.list_files(root)) == 3
    assert st.read_json(root.join("b.json")) == {"k": [1, 2]}
    assert st.exists(root.join("a", "one.bin")) and not st.exists(root.join("nope"))
    assert st.is_dir(root) and not st.is_dir(root.join("nope"))
    assert st.parquet_metadata(root.join("t.parquet")).num_rows == 3
    with st.filesystem(root).open_input_file(root.join("t.parquet").path) as f:
        assert pq.read_table(f).equals(table)
    with pytest.raises(NotFoundError):
        st.read_bytes(root.join("nope"))


def test_s3_download_folder_filters_and_signature(s3_env, make_bucket, tmp_path: Path) -> None:
    bucket = make_bucket()
    st = Storage.from_environment(s3_env.endpoint_url)
    model = parse_uri(f"s3://{bucket}/models/m")
    for name, data in {"config.json": b"{}", "model.safetensors": b"W" * 100, "sub/tok.json": b"t"}.items():
        st.write_bytes(model.join(name), data)
    got = st.download_folder(model, str(tmp_path / "light"), keep=lambda rel: not rel.endswith(".safetensors"))
    assert sorted(got) == ["config.json", "sub/tok.json"]
    assert (tmp_path / "light" / "sub" / "tok.json").read_bytes() == b"t"
    assert not (tmp_path / "light" / "model.safetensors").exists()
    sig = st.listing_signature(model)
    assert [s[0] for s in sig] == ["config.json", "model.safetensors", "sub/tok.json"]
    assert sig[1][1] == 100


def test_wrong_secret_is_named_not_shown(s3_env, make_bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = make_bucket()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-" + s3_env.secret_key[::-1])
    st = Storage.from_environment(s3_env.endpoint_url)
    with pytest.raises(StorageError) as err:
        st.list_files(parse_uri(f"s3://{bucket}/x"))
    text = str(err.value)
    assert "rejected the credentials" in text and "AWS_SECRET_ACCESS_KEY" in text
    assert s3_env.secret_key not in text and s3_env.secret_key[::-1] not in text


def test_missing_credentials_say_what_to_set(s3_server, make_bucket) -> None:
    bucket = make_bucket()
    st = Storage.from_environment(s3_server.endpoint_url)  # _isolated_aws: nothing configured
    assert st.credentials is None
    with pytest.raises(StorageError, match="no AWS credentials found"):
        st.list_files(parse_uri(f"s3://{bucket}/x"))


def test_parquet_bytes_is_one_complete_file() -> None:
    data = parquet_bytes(pa.table({"a": [1, 2]}))
    assert pq.read_table(io.BytesIO(data)).num_rows == 2
