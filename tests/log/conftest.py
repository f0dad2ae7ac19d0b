"""Fixtures of the log's tests: peers on a real nats-server, and the stranger."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from adversary import Attacker, MakeLog

from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey


@pytest.fixture
async def make_log(nats_url: str) -> AsyncIterator[MakeLog]:
    opened: list[Log] = []

    async def make(key: PeerKey | None = None, **overrides: Any) -> Log:
        """A connected peer (a fresh key unless ``key``), with ``LogConfig`` overrides."""
        config = dataclasses.replace(LogConfig(servers=(nats_url,)), **overrides)
        log = Log(config, key or PeerKey.generate())
        await log.connect()
        opened.append(log)
        return log

    yield make
    for log in opened:
        await log.close()


@pytest.fixture
async def attacker(nats_url: str) -> AsyncIterator[Attacker]:
    nc = await nats.connect(nats_url)
    try:
        yield Attacker(nc)
    finally:
        await nc.close()
