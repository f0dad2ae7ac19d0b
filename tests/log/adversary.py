"""The stranger of the log's attack tests: a fresh key and a raw nats-py connection, so no
Asman peer code decides what it sends (tests/log/test_adversary.py, test_policy.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
from nats.aio.client import Client as NATS

from asman.log import subjects, wire
from asman.log.connection import Log
from asman.log.events import now_ms
from asman.log.keys import PeerKey
from asman.log.leases import JobLease, WaitingIndex, claim

MakeLog = Callable[..., Awaitable[Log]]


class Attacker:
    """A fresh key and a raw connection: no Asman peer code decides what it sends."""

    def __init__(self, nc: NATS) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.key = PeerKey.generate()

    async def last_seq(self, subject: str) -> int:
        try:
            msg = await self.js.get_msg(subjects.JOBS_STREAM, subject=subject, direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def sign_on_top(self, subject: str, event: dict[str, Any]) -> int:
        """A well-formed, chained event of its own, appended like an honest one."""
        prev = await self.last_seq(subject)
        body = {"ts": now_ms(), **event, "prev": prev}
        ack = await self.js.publish(
            subject,
            wire.seal(self.key, subject, body),
            headers={subjects.HDR_EXPECTED_LAST_SUBJECT_SEQ: str(prev)},
        )
        return int(ack.seq)

    async def raw(self, subject: str, data: bytes) -> int:
        return int((await self.js.publish(subject, data)).seq)

    async def history(self, subject: str) -> list[bytes]:
        """Every envelope on the subject, as stored (to replay)."""
        out, seq = [], 1
        while True:
            try:
                msg = await self.js.get_msg(
                    subjects.JOBS_STREAM, seq=seq, next=True, subject=subject, direct=True
                )
            except nats.js.errors.NotFoundError:
                return out
            assert msg.data is not None
            out.append(msg.data)
            seq = int(msg.seq or 0) + 1


async def claim_waiting(log: Log, queue: str) -> JobLease:
    index = WaitingIndex(log, queue, asyncio.Event())
    await index.scan()
    for cand in sorted(index.entries.values(), key=lambda c: c.order):
        if cand.waiting:
            lease = await claim(log, queue, cand.job_id, cand.entry.seq)
            if lease is not None:
                return lease
    raise AssertionError("nothing to claim")
