"""Shared fixtures: real servers on loopback, never stand-ins.

When ``CI`` is set, a missing server (Docker engine, nats-server, S3, Chromium) fails the run
instead of skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from requiring import require  # noqa: F401 - re-exported for test modules

from asman.log.server import NatsServer

# shared fixture modules beside this file: a real Docker engine, a real S3 server
pytest_plugins = ["dockerfixtures", "s3server"]

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
os.environ.setdefault("TESTCONTAINERS_HOST_OVERRIDE", "127.0.0.1")


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream, its own store dir and free loopback ports."""
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    return nats_server.url
