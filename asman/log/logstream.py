"""Live job logs in ``ASMAN_LOGS``: batched, signed chunks of stdout, stderr and build output.

A worker appends a batch of chunks per message (never one message per line). Readers keep
only chunks signed by a worker that held a claim on the job, so nobody can inject lines into
another's job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from asman.errors import EnvelopeError
from asman.log import subjects, wire
from asman.log.connection import Log, translate_errors
from asman.log.events import JobState, now_ms

__all__ = ["LogChunk", "append_logs", "follow_logs", "read_logs", "writers"]

STREAMS = ("stdout", "stderr", "build", "system")


@dataclass(frozen=True, slots=True)
class LogChunk:
    seq: int
    attempt: int
    stream: str
    ts: int
    data: bytes


async def append_logs(
    log: Log, queue: str, job_id: str, attempt: int, chunks: Iterable[tuple[str, int, bytes]]
) -> int:
    """Append one batch of (stream, ts_ms, bytes) chunks; returns its stream sequence."""
    subject = subjects.logs_subject(queue, job_id)
    items = [[stream, ts, data] for stream, ts, data in chunks]
    event = {"type": "log", "ts": now_ms(), "attempt": attempt, "chunks": items}
    data = wire.seal(log.key, subject, event)
    with translate_errors(f"appending logs of {job_id}", log):
        ack = await log.js.publish(subject, data)
    return int(ack.seq)


def writers(state: JobState) -> frozenset[str]:
    """The peers whose log chunks count: those with an accepted claim on the job."""
    return frozenset(h.signer for h in state.history if h.accepted and h.type == "claimed")


def _decode(subject: str, seq: int, data: bytes, allowed: frozenset[str]) -> list[LogChunk]:
    try:
        opened = wire.open_envelope(data, subject)
    except EnvelopeError:
        return []
    if opened.signer not in allowed:
        return []
    attempt = opened.event.get("attempt", 0)
    items = opened.event.get("chunks", [])
    out = []
    if not isinstance(items, list) or not isinstance(attempt, int):
        return []
    for item in items:
        if (
            isinstance(item, list)
            and len(item) == 3
            and item[0] in STREAMS
            and isinstance(item[1], int)
            and isinstance(item[2], bytes)
        ):
            out.append(LogChunk(seq, attempt, item[0], item[1], item[2]))
    return out


async def read_logs(log: Log, state: JobState, start_seq: int = 1) -> tuple[list[LogChunk], int]:
    """Chunks of the job from ``start_seq``; returns them and the next cursor."""
    subject = subjects.logs_subject(state.queue, state.job_id)
    raw = await log.read_subject(subjects.LOGS_STREAM, subject, start_seq)
    allowed = writers(state)
    out: list[LogChunk] = []
    for ev in raw:
        out.extend(_decode(subject, ev.seq, ev.data, allowed))
    cursor = raw[-1].seq + 1 if raw else start_seq
    return out, cursor


async def follow_logs(
    log: Log, queue: str, job_id: str, start_seq: int = 1, poll_s: float = 2.0
) -> AsyncIterator[LogChunk]:
    """Chunks as they arrive, until the job is finished and every chunk was read."""
    from asman.log.jobs import read_job  # local: jobs imports nothing from here

    subject = subjects.logs_subject(queue, job_id)
    job_subject = subjects.job_subject(queue, job_id)
    wake = asyncio.Event()
    stops = [await log.wake_on(subject, wake), await log.wake_on(job_subject, wake)]
    cursor = start_seq
    try:
        while True:
            state = await read_job(log, queue, job_id)
            if state is None:
                return
            chunks, cursor = await read_logs(log, state, cursor)
            for chunk in chunks:
                yield chunk
            if state.finished:
                chunks, cursor = await read_logs(log, state, cursor)
                for chunk in chunks:
                    yield chunk
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_s):
                    await wake.wait()
            wake.clear()
    finally:
        for stop in stops:
            await stop()
