"""Session fixtures shared by the test suite.

- `ray_session`: ONE local Ray (2 CPUs, no dashboard) for the whole run; the
  pipelines find it through `ray.is_initialized()`.
- `s3_server`: a real SeaweedFS S3 server with enforced credentials, started once and
  stopped by PID; `s3_env` exports its credentials the standard AWS way; `make_bucket`.
- `tiny_model`: a tiny random TroL model folder from `python -m trol.tiny`, built once.
- `sample_images` / `write_shards`: input shards built from scikit-image's sample images.
All fixtures are lazy, so test files that need none of them pay nothing.
"""

from __future__ import annotations

import io
import itertools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from s3server import S3Server, ensure_bucket, start_s3_server

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _isolated_aws() -> Iterator[None]:
    """No developer profile or cloud metadata lookup may leak into (or slow down) tests."""
    mp = pytest.MonkeyPatch()
    for key in list(os.environ):
        if key.startswith("AWS_"):
            mp.delenv(key)
    mp.setenv("AWS_CONFIG_FILE", os.devnull)
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """Note on binding: Ray 2.60 on Linux replaces a 127.0.0.1 node address with the
    machine's routable one and its gRPC servers listen on all interfaces; what guards
    them is Ray's token authentication (on by default). The dashboard stays off."""
    import ray

    started = not ray.is_initialized()
    if started:
        # Workers import `pipelines` and `trol` from the checkout even without an install,
        # and the fine-tuning tests' step hooks from tests/.
        path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
        # Ray Train's controller polls workers every 2 s by default: each report() would
        # cost that much. Its preemption watcher (an actor per run, polling Ray for node
        # drains) watches for what a one-node test session never does: each run would pay
        # one more Ray process start. Set before init so every Ray process inherits them.
        train_env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
        for key, value in train_env.items():
            os.environ.setdefault(key, value)
        # Ray keeps idle worker processes up to its soft limit (its CPU count, 2 here) and
        # ends the rest after a second. With a run's actors counted against that limit, the
        # data tasks' processes ended between runs, and every run paid again for their
        # imports (torch + transformers, ~3 s of CPU each). 8 keeps them for the next run.
        ray.init(address="local", num_cpus=2, include_dashboard=False, _system_config={"num_workers_soft_limit": 8},
                 runtime_env={"env_vars": {"PYTHONPATH": path, **train_env}})
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's credentials in AWS_* variables, as a user would export them."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", s3_server.region)
    return s3_server


_bucket_ids = itertools.count()


@pytest.fixture
def make_bucket(s3_server: S3Server) -> Callable[[str], str]:
    """Create a fresh bucket (unique per call) and return its name."""

    def make(prefix: str = "t") -> str:
        name = f"{prefix}-{os.getpid()}-{next(_bucket_ids)}".lower()
        ensure_bucket(s3_server.client(), name)
        return name

    return make


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "tiny-trol"
    subprocess.run([sys.executable, "-m", "trol.tiny", str(out)], check=True, cwd=REPO, capture_output=True)
    assert (out / "config.json").is_file()
    return out


@pytest.fixture(scope="session")
def sample_images() -> dict[str, bytes]:
    """Encoded sample images: color and grayscale, PNG and JPEG, small to keep tests fast."""
    from PIL import Image
    from skimage import data

    out = {}
    for i, name in enumerate(["astronaut", "camera", "chelsea", "coffee", "coins", "rocket", "horse", "page"]):
        arr = getattr(data, name)()
        if arr.dtype == bool:
            arr = arr.astype(np.uint8) * 255
        img = Image.fromarray(arr)
        img.thumbnail((64, 64))
        buf = io.BytesIO()
        img.save(buf, format="PNG" if i % 2 else "JPEG")
        out[name] = buf.getvalue()
    return out


@pytest.fixture
def write_shards(sample_images: dict[str, bytes]) -> Callable[..., list[dict]]:
    """write_shards(dest, sizes, client=None) → rows written. `dest` is a local folder or an
    s3://bucket/prefix (then `client` is a boto3 client). Shard k has sizes[k] rows with ids
    "k-i", cycling through the sample images."""

    def write(dest: str, sizes: list[int], client=None) -> list[dict]:
        names = list(sample_images)
        rows_all = []
        for k, n in enumerate(sizes):
            rows = [{"id": f"{k}-{i}", "n": k * 1000 + i, "image": sample_images[names[(k + i) % len(names)]]}
                    for i in range(n)]
            table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("n", pa.int64()),
                                                                  ("image", pa.binary())]))
            buf = io.BytesIO()
            pq.write_table(table, buf)
            key = f"part-{k:03d}.parquet"
            if dest.startswith("s3://"):
                bucket, _, prefix = dest[len("s3://") :].partition("/")
                client.put_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/{key}".lstrip("/"), Body=buf.getvalue())
            else:
                Path(dest).mkdir(parents=True, exist_ok=True)
                (Path(dest) / key).write_bytes(buf.getvalue())
            rows_all.extend(rows)
        return rows_all

    return write
