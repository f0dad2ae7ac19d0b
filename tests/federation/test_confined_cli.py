"""The `asman worker` command under confined credentials (deploy/nats/accounts, issue 14):
with its queue's permissions only, it runs that queue's jobs end to end with a real Docker
engine and S3 for blobs (the object store is one shared bucket a tenant may not use), and a
permission the credentials lack is reported as such, not as a timeout."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from topology import ACCOUNT_PASSWORDS, Node

from asman.errors import LogError
from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey

pytestmark = [pytest.mark.docker]

ASMAN = str(Path(sys.executable).parent / "asman")
CONFINED = ("--reads", "consumer", "--no-manage-streams")


@pytest.fixture
async def admin(server: Node) -> AsyncIterator[Log]:
    log = Log(
        LogConfig(servers=(server.url_as("admin", ACCOUNT_PASSWORDS["admin"]),)), PeerKey.generate()
    )
    await log.connect()  # trusted: creates the streams
    try:
        yield log
    finally:
        await log.close()


async def test_a_confined_cli_worker_runs_its_queue_with_s3_blobs(
    server: Node,
    admin: Log,
    tmp_path: Path,
    s3_server: object,
    s3_bucket: str,
    busybox_image: str,
) -> None:
    endpoint = s3_server.endpoint  # type: ignore[attr-defined]
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "ASMAN_S3_ACCESS_KEY": s3_server.access_key,  # type: ignore[attr-defined]
        "ASMAN_S3_SECRET_KEY": s3_server.secret_key,  # type: ignore[attr-defined]
    }
    blobs = f"s3+http://{endpoint}/{s3_bucket}"
    worker_url = server.url_as("worker-alpha", ACCOUNT_PASSWORDS["worker-alpha"])
    worker_args = [
        "worker", "alpha", "--nats", worker_url, *CONFINED,
        "--inbox-prefix", "_INBOX.worker-alpha", "--blobs", blobs,
        "--data-dir", str(tmp_path / "w"),
    ]  # fmt: skip
    worker = await asyncio.to_thread(start, worker_args, env, tmp_path / "worker.log")
    try:
        client_url = server.url_as("client-alpha", ACCOUNT_PASSWORDS["client-alpha"])
        run = await asyncio.to_thread(
            subprocess.run,
            [ASMAN, "submit", "alpha", busybox_image, "--nats", client_url, *CONFINED,
             "--inbox-prefix", "_INBOX.client-alpha", "--blobs", blobs, "--wait",
             "--", "sh", "-c", "echo confined > /outputs/o.txt"],
            env=env, cwd=tmp_path, capture_output=True, timeout=120,
        )  # fmt: skip
        told = run.stderr.decode()
        assert run.returncode == 0, (told, (tmp_path / "worker.log").read_text())
        assert ": success, exit code 0" in told
        (out_dir,) = (tmp_path / "outputs").iterdir()
        assert (out_dir / "o.txt").read_text() == "confined\n"
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 60)
    assert worker.returncode == 0
    assert "did not answer in time" not in (tmp_path / "worker.log").read_text()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([ASMAN, "-v", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


async def test_a_permission_the_credentials_lack_is_named_not_a_timeout(server: Node) -> None:
    """The shared object store bucket is not the tenant's: a confined peer that tries it is
    told the server refused the permission (it used to read "NATS did not answer in time")."""
    config = LogConfig(
        servers=(server.url_as("worker-alpha", ACCOUNT_PASSWORDS["worker-alpha"]),),
        manage_streams=False,
        reads="consumer",
        inbox_prefix="_INBOX.worker-alpha",
        request_timeout_s=1.0,
    )
    async with Log(config, PeerKey.generate()) as log:
        with pytest.raises(LogError, match="refused this user's credentials the permission"):
            await jobs.list_jobs(log, "beta")  # another queue: not in its permissions
