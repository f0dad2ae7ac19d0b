"""Gateway fixtures (see gatewaystack.py): a fresh nats-server and gateway per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gatewaystack import Gateway, Stack

from asman.log.server import NatsServer


@pytest.fixture
async def stack(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[Stack]:
    s = Stack(nats_server, tmp_path)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def gateway(stack: Stack) -> Gateway:
    return await stack.gateway()
