"""Docker fixtures: a real engine and the local busybox image, never stand-ins.

Without a reachable engine the docker tests skip on a dev box and fail when ``CI`` is set.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest
import requests
from requiring import require

from asman.peer.docker import DockerRuntime
from asman.peer.images import build_busybox_image
from asman.peer.jobdir import JobDir, prepare_job_dir, remove_job_dir


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


@pytest.fixture
async def docker_runtime(busybox_image: str) -> AsyncIterator[DockerRuntime]:
    async with DockerRuntime() as runtime:
        yield runtime


@pytest.fixture
def job_dir(tmp_path: Path) -> Iterator[JobDir]:
    directory = prepare_job_dir(tmp_path / "jobs", "job-test", 1)
    try:
        yield directory
    finally:
        remove_job_dir(directory)
