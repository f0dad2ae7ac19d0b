"""Worker fixtures (see workerstack.py): a fresh nats-server and Docker workers per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from workerstack import Stack


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path, busybox_image: str) -> AsyncIterator[Stack]:
    s = Stack(nats_url, tmp_path)
    try:
        yield s
    finally:
        await s.close()
