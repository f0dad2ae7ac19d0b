"""Start the very configs in ``deploy/nats`` as real nats-server processes on loopback.

The configs are written for real hosts (``nats-1:6222``, ``0.0.0.0:4222``, ``/data/jetstream``).
``localize`` rewrites exactly those host:port pairs and paths to free loopback ports and a temp
dir, and fails when one of them is no longer in the file, so a config cannot drift away from
its test. Everything else in the file is used as written.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import nats.errors

from asman.log.server import NatsServer, free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NATS = DEPLOY / "nats"
STORE_DIR = '"/data/jetstream"'
HUBS = ("hub-1", "hub-2", "hub-3")
# users of deploy/nats/hub-leaf/*.conf
HUB_CLIENT = ("asman", "change-me-asman")
LEAF_WORKER = ("worker", "change-me-worker")
LEAF_LOCAL = ("local", "change-me-local")
ACCOUNT_PASSWORDS = {  # users of deploy/nats/accounts/nats.conf
    "admin": "change-me-admin",
    "worker-alpha": "change-me-worker-alpha",
    "client-alpha": "change-me-client-alpha",
    "uni-x": "change-me-uni-x",
}


def localize(src: Path, dest: Path, replace: Mapping[str, str]) -> Path:
    """Copy ``src`` to ``dest`` with every key of ``replace`` replaced by its value."""
    text = src.read_text()
    for old, new in replace.items():
        if old not in text:
            raise AssertionError(f"{src} no longer contains {old!r}: update tests/federation")
        text = text.replace(old, new)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


def http_json(port: int, path: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as resp:
        return json.loads(resp.read())


def healthy(port: int) -> bool:
    """Full /healthz: JetStream is up and current (a meta leader is known)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Node:
    """One server of a topology: its name in the config, its loopback ports, its process."""

    name: str
    client: int = field(default_factory=free_port)
    http: int = field(default_factory=free_port)
    route: int = field(default_factory=free_port)
    leaf: int = field(default_factory=free_port)
    server: NatsServer | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    def url_as(self, user: str, password: str) -> str:
        return f"nats://{user}:{password}@127.0.0.1:{self.client}"

    @property
    def proc(self) -> NatsServer:
        assert self.server is not None, f"{self.name} was never started"
        return self.server

    @property
    def running(self) -> bool:
        return self.server is not None and self.server.pid is not None


class Topology:
    """A set of nodes started from ``deploy/nats/<folder>/<name>.conf`` files."""

    def __init__(
        self,
        tmp: Path,
        folder: str,
        names: Iterable[str],
        *,
        clustered: bool = True,
        leaf_listen: bool = False,
        leaf_remotes: Topology | None = None,
    ) -> None:
        self.tmp = tmp
        self.folder = NATS / folder
        self.nodes = {name: Node(name) for name in names}
        self.clustered = clustered
        self.leaf_listen = leaf_listen
        self.leaf_remotes = leaf_remotes

    def replacements(self, node: Node) -> dict[str, str]:
        """Host:port pairs of ``node``'s config and where they go on loopback."""
        out = {
            "0.0.0.0:4222": f"127.0.0.1:{node.client}",
            "127.0.0.1:8222": f"127.0.0.1:{node.http}",  # monitoring: loopback only
            STORE_DIR: json.dumps(str(self.tmp / node.name)),
        }
        if self.clustered:
            for peer in self.nodes.values():
                out[f"{peer.name}:6222"] = f"127.0.0.1:{peer.route}"
            out["0.0.0.0:6222"] = f"127.0.0.1:{node.route}"
        if self.leaf_listen:
            out["0.0.0.0:7422"] = f"127.0.0.1:{node.leaf}"
        if self.leaf_remotes is not None:
            for hub in self.leaf_remotes.nodes.values():
                out[f"@{hub.name}:7422"] = f"@127.0.0.1:{hub.leaf}"
        return out

    def config(self, node: Node, replace: Mapping[str, str] | None = None) -> Path:
        path = localize(
            self.folder / f"{node.name}.conf",
            self.tmp / "conf" / f"{node.name}.conf",
            replace if replace is not None else self.replacements(node),
        )
        # includes are relative to the config's folder: bring them along
        for included in re.findall(r'^include\s+"([^"]+)"', path.read_text(), re.MULTILINE):
            shutil.copyfile(self.folder / included, path.parent / included)
        return path

    def start(self, *names: str, timeout: float = 30.0) -> Topology:
        """Start the named nodes (all by default) and wait until every running one is healthy."""
        for name in names or tuple(self.nodes):
            node = self.nodes[name]
            if node.server is None:
                node.server = NatsServer(
                    self.tmp / node.name,
                    port=node.client,
                    http_port=node.http,
                    config=self.config(node),
                )
            node.server.start(timeout=timeout)
        self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes.values():
            if not node.running:
                continue
            while not healthy(node.http):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{node.name} not healthy after {timeout:.0f}s")
                time.sleep(0.05)

    def kill(self, name: str) -> None:
        """kill -9 by PID."""
        self.nodes[name].proc.stop(kill=True)

    def stop(self, *names: str) -> None:
        for name in names or tuple(self.nodes):
            node = self.nodes[name]
            if node.server is not None:
                node.server.stop()

    def urls(self, *names: str) -> tuple[str, ...]:
        return tuple(self.nodes[n].url for n in names or tuple(self.nodes))

    def stream_leader(self, stream: str, account: str | None = None) -> str:
        """Name of the server leading ``stream``, from any running node's /jsz."""
        for node in self.nodes.values():
            if not node.running:
                continue
            query = "/jsz?streams=true" + (f"&acc={account}" if account else "")
            data = http_json(node.http, query)
            for acc in data.get("account_details", []):
                for st in acc.get("stream_detail", []):
                    if st.get("name") == stream and st.get("cluster", {}).get("leader"):
                        return str(st["cluster"]["leader"])
        raise LookupError(f"no leader known for stream {stream}")

    def leaders(self) -> dict[str, str | None]:
        """Every stream and consumer (``stream/consumer``) and its leader (None: none yet)."""
        leaders: dict[str, str | None] = {}
        for node in self.nodes.values():
            if not node.running:
                continue
            try:
                data = http_json(node.http, "/jsz?streams=true&consumers=true")
            except (urllib.error.URLError, OSError):
                continue
            for acc in data.get("account_details", []):
                for st in acc.get("stream_detail", []):
                    name = st["name"]
                    leaders[name] = leaders.get(name) or st.get("cluster", {}).get("leader")
                    for c in st.get("consumer_detail") or []:
                        key = f"{name}/{c['name']}"
                        leaders[key] = leaders.get(key) or c.get("cluster", {}).get("leader")
        return leaders

    def wait_leaders(self, assets: Iterable[str], timeout: float = 60.0) -> None:
        """Wait until each of ``assets`` (streams, ``stream/consumer``) has a leader: after a
        restart of the whole cluster /healthz is green seconds before that."""
        deadline = time.monotonic() + timeout
        while True:
            leaders = self.leaders()
            missing = sorted(a for a in assets if not leaders.get(a))
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no leader after {timeout:.0f}s for {missing}")
            time.sleep(0.2)


def wait_leaf_connected(leaf: Topology, timeout: float = 15.0) -> None:
    """Until the hub's JetStream answers a request sent through the leaf: the leaf node is
    connected and interest crossed it both ways (the request to the hub, the reply back).
    Nothing announces that, so the request is tried again until the deadline, which fails."""
    url = leaf.nodes["leaf"].url_as(*LEAF_WORKER)
    asyncio.run(_wait_hub_answers(url, time.monotonic() + timeout))


async def _wait_hub_answers(url: str, deadline: float) -> None:
    nc = await nats.connect(url, connect_timeout=2)
    try:
        while True:
            try:
                await nc.request("$JS.hub.API.INFO", b"", timeout=0.5)
                return
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError("the hub does not answer through the leaf") from None
                await asyncio.sleep(0.05)
    finally:
        await nc.close()
