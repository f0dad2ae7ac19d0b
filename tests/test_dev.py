"""`asman dev` as a real subprocess: up, a job through it, Ctrl-C, up again, the job is still
there (the data dir is reused)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from faults import Announcing

from asman.log.server import free_port

ASMAN = str(Path(sys.executable).parent / "asman")


def start_dev(
    data: Path, nats_port: int, http_port: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    argv = [ASMAN, "dev", "--data-dir", str(data), "--nats-port", str(nats_port)]
    argv += ["--http-port", str(http_port)]
    log = data.parent / f"dev-{time.monotonic_ns()}.log"
    dev = Announcing(argv, log, "asman dev is up", env=env)
    if not dev.seen.wait(60):
        dev.proc.kill()
        dev.proc.wait(10)
        pytest.fail(f"asman dev did not come up in 60 s: {dev.text()}")
    if dev.proc.poll() is not None or "asman dev is up" not in dev.text():
        dev.proc.wait(10)
        pytest.fail(f"asman dev exited: {dev.text()}")
    return dev.proc


def stop_dev(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


@pytest.mark.docker
@pytest.mark.slow
def test_dev_runs_a_job_stops_cleanly_and_keeps_it(tmp_path: Path, busybox_image: str) -> None:
    data = tmp_path / "dev"
    nats_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "ASMAN_NATS_URL": f"nats://127.0.0.1:{nats_port}",
    }
    proc = start_dev(data, nats_port, http_port, env)
    try:
        queue = (data / "queue").read_text().strip()
        done = subprocess.run(
            [
                ASMAN,
                "submit",
                queue,
                "asman/busybox:local",
                "--wait",
                "-o",
                str(tmp_path / "o"),
                "--",
                "sh",
                "-c",
                "echo kept > /outputs/k",
            ],
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert (tmp_path / "o" / "k").read_text() == "kept\n"
    finally:
        code = stop_dev(proc)
    assert code == 0
    # the nats-server it started is gone with it: the port is free again
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", nats_port), timeout=1).close()

    proc = start_dev(data, nats_port, http_port, env)
    try:
        assert (data / "queue").read_text().strip() == queue
        listed = subprocess.run(
            [ASMAN, "jobs", "ls", queue, "--json"], env=env, capture_output=True, timeout=60
        )
        jobs = json.loads(listed.stdout)
        assert len(jobs) == 1 and jobs[0]["reason"] == "success"
    finally:
        assert stop_dev(proc) == 0


@pytest.mark.docker
@pytest.mark.slow
def test_dev_upgrades_a_wire_v1_data_dir(tmp_path: Path, busybox_image: str) -> None:
    """A data dir an Asman 0.1 `asman dev` left behind: the new one migrates its log at start,
    says so in one line, and the unfinished jobs wait on the v2 log."""
    import asyncio

    from v1log import QUEUE, write_v1_log

    from asman.log.server import NatsServer

    data = tmp_path / "dev"
    data.mkdir()
    old = NatsServer(data / "nats", name="asman-dev")
    old.start()
    try:
        asyncio.run(write_v1_log(old.url))
    finally:
        old.stop()
    nats_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
        "ASMAN_NATS_URL": f"nats://127.0.0.1:{nats_port}",
    }
    proc = start_dev(data, nats_port, http_port, env)
    try:
        banner = "\n".join(p.read_text() for p in tmp_path.glob("dev-*.log"))
        assert "migrated from wire v1: 2 unfinished job(s) submitted again" in banner
        listed = subprocess.run(
            [ASMAN, "jobs", "ls", QUEUE, "--json"], env=env, capture_output=True, timeout=60
        )
        assert listed.returncode == 0, listed.stderr.decode()
        assert sorted(j["state"] for j in json.loads(listed.stdout)) == ["queued", "queued"]
    finally:
        assert stop_dev(proc) == 0


def _descendants(pid: int) -> list[int]:
    """Every process under ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _listening(pids: list[int]) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the processes listen on (/proc/net/tcp{,6})."""
    import ipaddress

    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexaddr)
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.add((str(ipaddress.ip_address(raw)), int(hexport, 16)))
    return found


@pytest.mark.docker
@pytest.mark.slow
def test_dev_is_open_and_listens_on_loopback_only(tmp_path: Path, busybox_image: str) -> None:
    """`asman dev` is the open stack, by design (issue 14): whoever reaches its NATS port
    lists every queue, reads every job and listens to everything, with no login. So it listens
    on 127.0.0.1 only, nats-server, its monitoring port and the gateway alike; and Asman's
    CLI keeps its fast direct reads there (no auth, so nothing confined)."""
    import asyncio

    data = tmp_path / "dev"
    nats_port, http_port = free_port(), free_port()
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    proc = start_dev(data, nats_port, http_port, env)
    try:
        _wait_answers(f"http://127.0.0.1:{http_port}/healthz")  # the gateway listens
        addresses = _listening([proc.pid, *_descendants(proc.pid)])
        assert {nats_port, http_port} <= {port for _, port in addresses}, addresses
        assert len(addresses) >= 3, addresses  # nats, its monitoring port, the gateway
        assert {host for host, _ in addresses} == {"127.0.0.1"}, addresses
        queue = (data / "queue").read_text().strip()
        asyncio.run(_what_the_open_stack_shows(f"nats://127.0.0.1:{nats_port}", queue))
    finally:
        assert stop_dev(proc) == 0


def _wait_answers(url: str, timeout: float = 30) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


async def _what_the_open_stack_shows(url: str, queue: str) -> None:
    import nats

    from asman.log import jobs, subjects
    from asman.log.connection import Log, LogConfig
    from asman.log.keys import PeerKey

    config = LogConfig(servers=(url,), queues=(queue,))
    async with Log(config, PeerKey.generate()) as log:
        assert not log.confined and log.config.reads == "direct"
        secret = await jobs.submit(log, "another-queue", {"image": "x", "command": "true"})
    nc = await nats.connect(url)  # anonymous
    try:
        assert nc._server_info.get("auth_required") is not True
        names = json.loads((await nc.request("$JS.API.STREAM.NAMES", b"", timeout=5)).data)
        assert subjects.JOBS_STREAM in names["streams"]
        info = await nc.request(
            f"$JS.API.STREAM.INFO.{subjects.JOBS_STREAM}",
            json.dumps({"subjects_filter": ">"}).encode(),
            timeout=5,
        )
        # every queue's name is there for the reading
        assert (
            subjects.job_subject("another-queue", secret.job_id)
            in json.loads(info.data)["state"]["subjects"]
        )
        await nc.subscribe(">")
        await nc.flush()
        assert nc.last_error is None
    finally:
        await nc.close()
