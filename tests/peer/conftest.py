"""Worker fixtures (see workerstack.py): a fresh nats-server and Docker workers per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from faults import HEARTBEAT_TTL_S, LEASE_S, Cli
from workerstack import Stack

from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path, busybox_image: str) -> AsyncIterator[Stack]:
    s = Stack(nats_url, tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def client(nats_url: str) -> AsyncIterator[Log]:
    """A client that creates the streams with short rules (``faults.LEASE_S``), before any
    worker of the test starts: fault tests see takeovers in seconds."""
    log = Log(
        LogConfig(servers=(nats_url,), lease_ttl_s=LEASE_S, heartbeat_ttl_s=HEARTBEAT_TTL_S),
        PeerKey.generate(),
    )
    await log.connect()
    try:
        yield log
    finally:
        await log.close()


@pytest.fixture
def cli(tmp_path: Path, nats_url: str, busybox_image: str) -> Iterator[Cli]:
    """``asman`` processes of one test, stopped by PID at its end."""
    c = Cli(tmp_path, nats_url)
    try:
        yield c
    finally:
        c.stop_all()
