"""The nats-server process the tests, `asman dev` and the benchmarks start."""

from __future__ import annotations

import socket
from pathlib import Path

from asman.log.server import NatsServer, free_port


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


def test_picked_ports_are_distinct_and_out_of_the_ephemeral_range() -> None:
    """Ports from the kernel's ephemeral range can go to any outgoing connection before a
    server binds them; free_port stays below it (where the machine has one)."""
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(p < low for p in ports)
