"""A real two-node Ray cluster on loopback, started the way a user would: `ray start`.

Other Ray sessions share this machine (other test runs, other people), so this cluster must
never find or be found by them, and stopping it must touch only its own processes:

- every port is chosen free here and passed explicitly; nodes and dashboard use 127.0.0.1,
  and token auth stays on (Ray's gRPC servers still listen on every interface);
- private `--temp-dir`s keep its sockets, logs and `ray_current_cluster` file out of
  /tmp/ray, where a bare `ray.init()` elsewhere would look for a cluster to join;
- its processes are recognised by a marker variable in their environment, which every
  process Ray starts (raylets, workers, job drivers) inherits from `ray start`. Stopping
  signals exactly those PIDs. A bare `ray stop` would kill every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "TROL_TEST_RAY_CLUSTER"


def free_tcp_ports(count: int) -> list[int]:
    """Distinct ports that are free on loopback right now."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)  # held open until all are picked, so none repeats
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def processes_with_marker(marker_value: str) -> list[int]:
    """PIDs of live processes whose environment carries MARKER=marker_value."""
    needle = f"{MARKER}={marker_value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:  # gone already, or another user's process
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


@dataclass
class LocalRayCluster:
    """`ray start --head` plus one `ray start --address` worker node, both on 127.0.0.1."""

    bin_dir: Path  # the environment whose `ray` and `python` the nodes run
    cpus_per_node: int = 3
    object_store_bytes: int = 400 * 1024 * 1024
    extra_env: dict[str, str] = field(default_factory=dict)
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    token: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    temp_dir: Path | None = None
    gcs_port: int = 0
    dashboard_port: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def get_json(self, path: str, timeout: float = 30) -> Any:
        """GET a dashboard REST path (jobs, state API) with this cluster's token."""
        request = urllib.request.Request(f"{self.dashboard_url}{path}",
                                         headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)

    def env(self) -> dict[str, str]:
        """Environment for the nodes and for the CLI calls made against them."""
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        # `ray job submit` runs its entrypoint with the first `python` on the raylet's PATH.
        env["PATH"] = f"{self.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env.update({
            # Token auth stays on: whatever address the nodes advertise, Ray's gRPC servers
            # listen on every interface. A fresh token per cluster, in the environment only.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            MARKER: self.marker,
        })
        env.update(self.extra_env)
        return env

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bin_dir / "ray"), *args]
        done = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout)
        self.log.append(f"$ ray {' '.join(args)}\n{done.stdout}\n{done.stderr}")
        if done.returncode != 0:
            raise RuntimeError(f"`ray {args[0]}` failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def _node_ports(self) -> list[str]:
        names = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port"]
        return [f"{name}={port}" for name, port in zip(names, free_tcp_ports(len(names)))]

    def start(self) -> None:
        # Short path: Ray's unix sockets live under it, and socket paths are capped at ~107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="trolray-", dir="/tmp"))
        self.gcs_port, self.dashboard_port, client_port = free_tcp_ports(3)
        common = ["--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus_per_node}", "--num-gpus=0",
                  f"--object-store-memory={self.object_store_bytes}", "--disable-usage-stats"]
        # One temp dir per node, as separate machines have. Shared, both runtime-env agents
        # unpack a job's working_dir into the same folder: when the worker node unpacked it
        # for a training worker, the driver on the head lost its current directory.
        self._ray("start", "--head", f"--port={self.gcs_port}", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                  f"--ray-client-server-port={client_port}", f"--temp-dir={self.temp_dir / 'head'}",
                  *common, *self._node_ports())
        self._ray("start", f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.temp_dir / 'worker'}",
                  *common, *self._node_ports())

    def stop(self, grace_s: float = 3.0) -> list[int]:
        """Stop every process of this cluster (and only those); return any still alive.
        The GCS and dashboard linger on SIGTERM; a test cluster has nothing to flush, so
        whatever is left after `grace_s` is killed."""
        pids = processes_with_marker(self.marker)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = processes_with_marker(self.marker)
        for _ in range(3):  # a raylet may have forked a worker between listing and signal
            for pid in pids:
                _signal(pid, signal.SIGKILL)
            time.sleep(0.5)
            pids = processes_with_marker(self.marker)
        survivors = pids
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return survivors


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
