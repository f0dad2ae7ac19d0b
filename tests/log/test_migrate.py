"""Upgrading from wire v1 (Asman 0.1) against a real nats-server: a v2 peer refuses a v1 log
with one line, and ``asman migrate`` carries the unfinished jobs over (the v1 log is written
by ``tests/v1log.py`` as Asman 0.1 wrote it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from v1log import RUNNING, WAITING, write_v1_log

from asman.errors import WireVersionMismatch
from asman.log import jobs, subjects, wire
from asman.log.connection import Log, LogConfig
from asman.log.definition import job_id
from asman.log.keys import PeerKey
from asman.log.leases import WaitingIndex
from asman.log.migrate import migrate


async def test_a_v1_log_is_refused_with_one_line_then_migrated(nats_url: str) -> None:
    await write_v1_log(nats_url)
    config = LogConfig(servers=(nats_url,))
    with pytest.raises(WireVersionMismatch, match=r"wire format v1.*asman migrate") as err:
        async with Log(config, PeerKey.generate()):
            pass
    assert "\n" not in str(err.value)

    migrator = Log(config, PeerKey.generate())
    await migrator.connect(setup=False)
    try:
        dry = await migrate(migrator, dry_run=True)
        assert dry.found_v1 and len(dry.carried) == 2 and dry.finished_left == 1
        report = await migrate(migrator)
    finally:
        await migrator.close()
    assert report.found_v1 and report.finished_left == 1
    assert sorted(j for _, j in report.carried) == sorted([job_id(WAITING), job_id(RUNNING)])
    assert "2 unfinished job(s) submitted again" in report.summary()

    async with Log(config, PeerKey.generate()) as log:  # v2 now: no error
        names = {s.config.name for s in await log.js.streams_info()}
        assert subjects.V1_PENDING_STREAM not in names
        info = await log.js.stream_info(subjects.JOBS_STREAM)
        assert (info.config.metadata or {})[subjects.META_WIRE] == str(wire.SCHEMA_VERSION)
        states = {s.job_id: s for s in await jobs.list_jobs(log, "old")}
        assert set(states) == {job_id(WAITING), job_id(RUNNING)}
        assert all(s.state == "queued" and s.via == "migrated" for s in states.values())
        index = WaitingIndex(log, "old", asyncio.Event())
        await index.scan()
        assert {c.job_id for c in index.entries.values() if c.waiting} == set(states)
        assert not (await migrate(log)).found_v1  # a second run has nothing to do


async def test_asman_migrate_on_the_command_line(nats_url: str, tmp_path: Path) -> None:
    await write_v1_log(nats_url)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    run = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "asman"), "migrate", "--nats", nats_url, "--json"],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert run.returncode == 0, run.stderr.decode()
    out = json.loads(run.stdout)
    assert out["found_v1"] and len(out["carried"]) == 2 and out["finished_left"] == 1
    again = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "asman"), "migrate", "--nats", nats_url],
        capture_output=True,
        timeout=60,
        env=env,
    )
    assert again.stdout.decode().strip() == "the log is already wire v2: nothing to migrate"
