"""The local test and dev image ``asman/busybox:local``, built without a registry.

There is no registry to pull from on the machines Asman is developed and tested on, so the
image is made the way ``docker import`` makes one: a root file system tarred in memory and
imported through the SDK. The root holds Debian's statically linked ``/bin/busybox`` with a
symlink per applet, ``/tmp`` (1777) and an ``/etc/passwd`` naming ``nobody`` (65534).

The image carries the sha256 of its tar as the label ``asman.content``; a second build with the
same busybox finds the label and does nothing. ``python -m asman.peer.images`` (what
``make images`` runs) builds it and prints one line.

This is a one-shot tool, not part of the worker's event loop, so it calls the synchronous
SDK directly; the worker's Docker traffic goes through :mod:`asman.peer.docker`.
"""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests

from asman.errors import AsmanError, DockerUnavailable, ImageError

__all__ = [
    "BUSYBOX",
    "BUSYBOX_IMAGE",
    "CONTENT_LABEL",
    "BuiltImage",
    "build_busybox_image",
    "main",
    "rootfs_tar",
]

BUSYBOX_IMAGE = "asman/busybox:local"
BUSYBOX = Path("/bin/busybox")
CONTENT_LABEL = "asman.content"

_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
_MTIME = 0  # fixed, so the same busybox always gives the same tar and the same label


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """The outcome of :func:`build_busybox_image`."""

    tag: str
    image_id: str
    content: str  # sha256 of the root file system tar
    size_bytes: int
    built: bool  # False: an image with the same content was already there
    seconds: float


def rootfs_tar(busybox: Path = BUSYBOX) -> bytes:
    """Tar the root file system in memory: busybox, its applet links, /tmp, /etc."""
    if not busybox.is_file():
        raise ImageError(
            f"{busybox} is missing: install Debian's busybox-static "
            "(apt-get install busybox-static, or `make system`)"
        )
    binary = busybox.read_bytes()
    try:
        listing = subprocess.run(
            [str(busybox), "--list"], check=True, capture_output=True, timeout=30
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(
            f"{busybox} --list failed ({exc}): install Debian's busybox-static, which is "
            "statically linked"
        ) from exc
    applets = sorted({a.strip() for a in listing.split() if a.strip() and "/" not in a})

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, data: bytes = b"", link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, _MTIME
            info.uid = info.gid = 0
            info.linkname = link
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)

        for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777)):
            add(d, tarfile.DIRTYPE, mode)
        add("bin/busybox", tarfile.REGTYPE, 0o755, binary)
        for applet in applets:
            if applet != "busybox":
                add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("etc/passwd", tarfile.REGTYPE, 0o644, _PASSWD)
        add("etc/group", tarfile.REGTYPE, 0o644, _GROUP)
    return buf.getvalue()


def build_busybox_image(
    client: Any | None = None, *, busybox: Path = BUSYBOX, tag: str = BUSYBOX_IMAGE
) -> BuiltImage:
    """Import ``tag`` from busybox unless an image with the same content is already there.

    ``client`` is a ``docker.DockerClient``; by default one is made from the environment.
    """
    t0 = time.perf_counter()
    data = rootfs_tar(busybox)
    content = hashlib.sha256(data).hexdigest()
    own = client is None
    try:
        if client is None:
            client = docker.from_env()
        api = client.api
        try:
            attrs = api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            attrs = None
        if (
            attrs is not None
            and (attrs.get("Config") or {}).get("Labels", {}).get(CONTENT_LABEL) == content
        ):
            return BuiltImage(
                tag, attrs["Id"], content, int(attrs.get("Size", 0)), False, _since(t0)
            )
        repo, _, version = tag.rpartition(":")
        api.import_image_from_data(
            data,
            repository=repo,
            tag=version,
            changes=[
                "ENV PATH=/bin",
                'CMD ["/bin/sh"]',
                f"LABEL {CONTENT_LABEL}={content}",
            ],
        )
        attrs = api.inspect_image(tag)
        return BuiltImage(tag, attrs["Id"], content, int(attrs.get("Size", 0)), True, _since(t0))
    except (docker.errors.DockerException, requests.exceptions.ConnectionError) as exc:
        if isinstance(exc, docker.errors.APIError) and exc.status_code is not None:
            raise ImageError(
                f"importing {tag} failed: {exc.explanation or exc}", log=str(exc)
            ) from exc
        raise DockerUnavailable(
            f"no Docker engine reachable ({exc}): start dockerd (scripts/start-dockerd.sh) "
            "or set DOCKER_HOST"
        ) from exc
    finally:
        if own and client is not None:
            client.close()


def _since(t0: float) -> float:
    return time.perf_counter() - t0


def main() -> int:
    try:
        image = build_busybox_image()
    except AsmanError as exc:
        print(f"asman: {exc}", file=sys.stderr)
        return exc.exit_code
    what = "built" if image.built else "up to date"
    print(
        f"{image.tag} {what}: {image.image_id[:19]}, {image.size_bytes / 1e6:.1f} MB, "
        f"content {image.content[:12]}, {image.seconds:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
