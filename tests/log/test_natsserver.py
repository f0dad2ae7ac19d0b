"""The nats-server process the tests, `asman dev` and the benchmarks start."""

from __future__ import annotations

import socket
from pathlib import Path

from asman.log.server import NatsServer


def test_a_picked_port_taken_before_the_server_binds_it_is_picked_again(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    taken = server.http_port
    with socket.socket() as other:  # someone else binds the port first
        other.bind(("127.0.0.1", taken))
        other.listen()
        server.start()
        try:
            assert server.http_port != taken
            assert server.pid is not None
        finally:
            server.stop()
    assert b"address already in use" in server.log_file.read_bytes()
