"""`asman dev` as a real subprocess: up, a job through it, Ctrl-C, up again, the job is still
there (the data dir is reused)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asman.log.server import free_port

ASMAN = str(Path(sys.executable).parent / "asman")


def start_dev(
    data: Path, nats_port: int, http_port: int, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    log = open(data.parent / f"dev-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            ASMAN,
            "dev",
            "--data-dir",
            str(data),
            "--nats-port",
            str(nats_port),
            "--http-port",
            str(http_port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = Path(log.name).read_text()
        if "asman dev is up" in text:
            return proc
        if proc.poll() is not None:
            pytest.fail(f"asman dev exited: {text}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"asman dev did not come up: {Path(log.name).read_text()}")


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
