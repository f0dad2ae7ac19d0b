"""Live updates by Server-Sent Events: a job stream and a queue stream.

Job stream (``GET /api/v1/queues/{q}/jobs/{id}/events``): on connect it replays the job's
history (its current state and every log chunk so far), then sends each change as it lands
on the log, and closes after the final result.

=========  ====  ===========================================================================
event      id    data
=========  ====  ===========================================================================
state      yes   the job (as ``GET …/jobs/{id}`` without definition and history)
log        yes   ``{"seq", "chunks": [{seq, attempt, stream, ts, text}]}``: one log message
waiting    no    ``{"code", "message"}``: why a queued job has not started (on change)
end        yes   the final job, once finished; the stream closes after it
error      no    ``{"error", "code"}`` when the stream cannot go on
=========  ====  ===========================================================================

Event ids are ``<job seq>-<log seq>``: the last job event and the last log message the client
has. A client that reconnects with ``Last-Event-ID`` (browsers do it by themselves; or
``?lastEventId=``) gets exactly what came after, so a dropped connection loses nothing.

Queue stream (``GET /api/v1/queues/{q}/events``): ``job`` events (a job summary, id = the
sequence of the job's last event, in increasing order) for every job, then for each change;
``workers`` events (no id) with the live workers whenever they change.

All the streams of one job share one reader, the job's ``JobFollower``
(``asman.gateway.follow``): it reads the job, its new log chunks and (while queued) the live
workers once per change, however many browsers watch, and each stream sends its own client
what it has not had yet. The streams of one queue share its ``QueueFollower`` the same way.
A follower never holds a NATS subscription as its only source of truth: it wakes on
messages, after a reconnect, and every ``poll_s`` as a safety net, and re-reads the log; a
read that fails while NATS is away is retried, so a stream survives a NATS restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from asman.errors import AsmanError, LogUnavailable
from asman.gateway.follow import Followers
from asman.gateway.limits import client_key
from asman.gateway.middleware import error_body
from asman.gateway.state import CLOSING, CONFIG, LIMITER, METRICS
from asman.gateway.views import Waiting
from asman.log.events import JobState
from asman.log.logstream import LogChunk, read_logs
from asman.log.workers import WorkerInfo

__all__ = [
    "MAX_SEQ",
    "Cursor",
    "JobEvent",
    "QueueEvent",
    "job_events",
    "queue_events",
    "stream",
]

logger = logging.getLogger(__name__)

RETRY_MS = 2000
MAX_SEQ = 2**62  # stream sequences are uint64; anything larger is not one of ours
Outgoing = tuple[str, Any, str | None]  # (event name, JSON data, id)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a job stream is: the last job event and the last log message delivered."""

    job_seq: int = 0
    log_seq: int = 0

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        """Read an event id; anything unreadable starts from the beginning."""
        if not text:
            return cls()
        job, _, logs = text.strip().partition("-")
        try:
            j, lg = int(job), int(logs or 0)
        except ValueError:
            return cls()
        if not (0 <= j <= MAX_SEQ and 0 <= lg <= MAX_SEQ):
            return cls()
        return cls(j, lg)

    def __str__(self) -> str:
        return f"{self.job_seq}-{self.log_seq}"


@dataclass(frozen=True, slots=True)
class JobEvent:
    """One thing that happened to a job: ``state``, ``log``, ``waiting`` or ``end``.
    ``waiting`` is also set on a ``state`` event of a queued job (why it waits, then)."""

    kind: str
    state: JobState
    cursor: Cursor | None = None
    chunks: tuple[LogChunk, ...] = ()
    waiting: Waiting | None = None


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """``job`` (a job changed) or ``workers`` (the live workers changed)."""

    kind: str
    job: JobState | None = None
    workers: tuple[WorkerInfo, ...] = ()


async def job_events(
    followers: Followers, queue: str, job: str, start: Cursor
) -> AsyncIterator[JobEvent]:
    """The job's events after ``start``, live, until it is finished (see module docstring).

    The reads are the job's follower's, shared with every other stream of the job; this
    stream picks from each snapshot what its client has not had yet."""
    sent_job = start.job_seq
    log_next = start.log_seq + 1
    last_waiting: Waiting | None = None
    async with followers.follow_job(queue, job) as follower:
        while True:
            changed = follower.changed()
            await follower.ready()
            if follower.error is not None:
                raise follower.error
            state = follower.state
            if state is None:
                return
            if log_next < follower.base_seq:
                # older than the follower's buffer: read those chunks from the log, up to
                # where the buffer starts now (it may have moved on during the read)
                try:
                    older, end = await read_logs(follower.log, state, log_next)
                except LogUnavailable:
                    await asyncio.sleep(min(follower.poll_s, 1.0))
                    continue
                upto = min(end, follower.base_seq)
                early = [c for c in older if c.seq < upto]
                for seq, group in groupby(early, key=lambda c: c.seq):
                    yield JobEvent("log", state, Cursor(sent_job, seq), tuple(group))
                log_next = max(log_next, upto)
                continue
            # one snapshot: nothing below changes the follower until the first yield
            chunks = follower.chunks_from(log_next)
            cursor = follower.log_next
            now = follower.waiting
            for seq, group in groupby(chunks, key=lambda c: c.seq):
                yield JobEvent("log", state, Cursor(sent_job, seq), tuple(group))
            log_next = max(log_next, cursor)
            if state.last_seq > sent_job:
                sent_job = state.last_seq
                yield JobEvent("state", state, Cursor(sent_job, log_next - 1), waiting=now)
            if state.state == "queued":
                if now is not None and now != last_waiting:
                    last_waiting = now
                    yield JobEvent("waiting", state, waiting=now)
            else:
                last_waiting = None
            if state.finished:
                yield JobEvent("end", state, Cursor(sent_job, log_next - 1))
                return
            if follower.done:
                return  # nothing more will change (a stopped follower carries an error)
            await changed.wait()


async def queue_events(
    followers: Followers, queue: str, after_seq: int
) -> AsyncIterator[QueueEvent]:
    """Every job of the queue changed after ``after_seq`` (oldest change first), then each
    change; and the live workers whenever they change. The reads are the queue's follower's,
    shared with every other stream of the queue."""
    sent = after_seq
    workers_sent = 0
    async with followers.follow_queue(queue) as follower:
        while True:
            changed = follower.changed()
            await follower.ready()
            if follower.error is not None:
                raise follower.error
            # one snapshot: nothing below changes the follower until the first yield
            jobs = follower.changes_after(sent)
            workers, version = follower.workers, follower.workers_version
            for state in jobs:
                sent = state.last_seq
                yield QueueEvent("job", job=state)
            if version != workers_sent:
                workers_sent = version
                yield QueueEvent("workers", workers=workers)
            if follower.done:
                return  # nothing more will change (a stopped follower carries an error)
            await changed.wait()


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


async def stream(request: web.Request, events: AsyncIterator[Outgoing]) -> web.StreamResponse:
    """Send ``events`` as an SSE response until they end, the client leaves, or the gateway
    shuts down. Counts against the client's open-stream limit."""
    app = request.app
    config = app[CONFIG]
    limiter = app[LIMITER]
    client = client_key(request, trust_forwarded=config.trust_forwarded)
    limiter.open_stream(client)
    app[METRICS].streams.inc()
    response = EventSourceResponse(
        ping_interval=config.sse_ping_s,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
    try:
        await response.prepare(request)
        await response.send("", event="hello", retry=RETRY_MS)

        async def pump() -> None:
            try:
                async for name, data, event_id in events:
                    await response.send(_dumps(data), event=name, id=event_id)
            except AsmanError as exc:
                _, body = error_body(exc)
                await response.send(_dumps(body), event="error")

        tasks = [
            asyncio.ensure_future(pump()),
            asyncio.ensure_future(response.wait()),
            asyncio.ensure_future(app[CLOSING].wait()),
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, ConnectionError, TimeoutError):
                    await task
        with contextlib.suppress(RuntimeError):
            response.stop_streaming()
    except (ConnectionError, TimeoutError):
        pass  # the client went away
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        limiter.close_stream(client)
        app[METRICS].streams.dec()
    return response
