"""Job streams share one reader per job (``asman.gateway.follow``), against a real nats-server.

The job is driven through the lease protocol itself (claim, start, signed log chunks, finish),
so the streams see exactly what a worker would write."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from asman.errors import LogUnavailable
from asman.gateway import follow, sse
from asman.gateway.follow import Followers
from asman.gateway.sse import Cursor, JobEvent, job_events, queue_events
from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.events import JobState
from asman.log.keys import PeerKey
from asman.log.leases import JobLease, claim
from asman.log.logstream import append_logs

QUEUE = "follow"
DEF = {"image": "asman/busybox:local", "command": "echo hi"}
LINES = [f"line {i}\n".encode() for i in range(12)]


@pytest.fixture
async def logs(nats_url: str) -> AsyncIterator[tuple[Log, Log]]:
    """(the gateway's log, a worker's log)"""
    async with (
        Log(LogConfig(servers=(nats_url,)), PeerKey.generate()) as gateway,
        Log(LogConfig(servers=(nats_url,)), PeerKey.generate()) as worker,
    ):
        yield gateway, worker


class CountingReads:
    """Counts the gateway's log reads (the real ``read_subject``, called through)."""

    def __init__(self, log: Log) -> None:
        self.calls = 0
        real = log.read_subject

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return await real(*args, **kwargs)

        log.read_subject = counted  # type: ignore[method-assign]


async def take_job(worker: Log, job_id: str) -> JobLease:
    lease = await claim(worker, QUEUE, job_id)
    assert lease is not None
    return lease


async def run_job(
    worker: Log,
    job_id: str,
    pause: float = 0.05,
    gate: tuple[int, asyncio.Event] | None = None,
) -> None:
    """Claim, start, write LINES as one log message each, finish as success. ``pause`` is
    the job's own pace (each line a change of its own); with ``gate = (i, event)`` the job
    holds after line ``i`` until ``event`` is set."""
    lease = await take_job(worker, job_id)
    await lease.start()
    for i, line in enumerate(LINES):
        await append_logs(worker, QUEUE, job_id, lease.attempt, [("stdout", 0, line)])
        if gate is not None and i == gate[0]:
            async with asyncio.timeout(30):
                await gate[1].wait()
        await asyncio.sleep(pause)
    await lease.finish({"reason": "success", "exit_code": 0})


async def watch(followers: Followers, job_id: str, start: Cursor) -> list[JobEvent]:
    out = []
    async with asyncio.timeout(30):
        async for ev in job_events(followers, QUEUE, job_id, start):
            out.append(ev)
    return out


class Watch:
    """One job stream in a task: its events so far, and a way to wait for the next ones."""

    def __init__(self, followers: Followers, job_id: str, start: Cursor | None = None) -> None:
        self.events: list[JobEvent] = []
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(followers, job_id, start or Cursor()))

    async def _run(self, followers: Followers, job_id: str, start: Cursor) -> list[JobEvent]:
        try:
            async with asyncio.timeout(30):
                async for ev in job_events(followers, QUEUE, job_id, start):
                    self.events.append(ev)
                    self._changed.set()
        finally:
            self._changed.set()  # ended: a waiter looks once more
        return self.events

    async def has(self, n: int, kind: str | None = None, timeout: float = 30) -> None:
        """Until the stream has sent ``n`` events (of ``kind``); fails if it ends first."""
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                if sum(1 for e in self.events if kind in (None, e.kind)) >= n:
                    return
                if self.task.done():
                    self.task.result()
                    raise AssertionError(f"the stream ended after {len(self.events)} events")
                await self._changed.wait()


def stdout(events: list[JobEvent]) -> bytes:
    return b"".join(c.data for e in events if e.kind == "log" for c in e.chunks)


def shape(events: list[JobEvent]) -> list[tuple[str, str]]:
    return [(e.kind, str(e.cursor)) for e in events if e.kind in ("log", "state", "end")]


async def test_many_streams_of_one_job_share_one_reader(logs: tuple[Log, Log]) -> None:
    gateway, worker = logs
    submitted = await jobs.submit(gateway, QUEUE, DEF)
    followers = Followers(gateway, poll_s=30.0)
    reads = CountingReads(gateway)
    watchers = [Watch(followers, submitted.job_id) for _ in range(25)]
    for w in watchers:  # every stream is open (it sent the job's state) before the job moves
        await w.has(1)
    assert len(followers) == 1
    await run_job(worker, submitted.job_id)
    results = await asyncio.gather(*(w.task for w in watchers))

    # every stream saw the same thing, in order: the job queued, running, its 12 log lines,
    # then its end, with growing ids
    for events in results:
        assert stdout(events) == b"".join(LINES)
        assert shape(events) == shape(results[0])
        assert events[-1].kind == "end" and events[-1].state.reason == "success"
        states = [e.state.state for e in events if e.kind == "state"]
        assert states[0] == "queued" and states[-1] == "finished"
    # one reader: its reads follow the changes, not the number of streams (25 streams that
    # each read the job and its logs on each of its ~15 changes make 750 reads or more)
    assert reads.calls < 150, reads.calls
    assert len(followers) == 0  # the last stream to leave stopped the reader


async def test_late_and_resuming_streams_get_exactly_what_they_miss(
    logs: tuple[Log, Log],
) -> None:
    gateway, worker = logs
    submitted = await jobs.submit(gateway, QUEUE, DEF)
    # a buffer too small to hold more than the newest log message: a stream that needs older
    # chunks reads them from the log itself
    followers = Followers(gateway, poll_s=30.0, buffer_bytes=8)
    live = Watch(followers, submitted.job_id)
    await live.has(1)  # open before the job moves
    await run_job(worker, submitted.job_id, pause=0.02)
    full = await live.task
    assert stdout(full) == b"".join(LINES)

    # joins after the end, from the beginning: the whole history, once, then the same end
    late = await watch(followers, submitted.job_id, Cursor())
    assert shape(late)[-1] == shape(full)[-1]
    assert [e.chunks for e in late if e.kind == "log"] == [
        e.chunks for e in full if e.kind == "log"
    ]

    # resumes from the 5th log message: exactly the 7 lines after it, then the end
    logs_seen = [e for e in full if e.kind == "log"]
    resume_at = logs_seen[4].cursor
    assert resume_at is not None
    rest = await watch(followers, submitted.job_id, resume_at)
    assert stdout(rest) == b"".join(LINES[5:])
    assert rest[-1].kind == "end"


async def test_a_stream_that_joins_while_the_job_runs_misses_nothing(
    logs: tuple[Log, Log],
) -> None:
    gateway, worker = logs
    submitted = await jobs.submit(gateway, QUEUE, DEF)
    followers = Followers(gateway, poll_s=30.0, buffer_bytes=20)
    first = Watch(followers, submitted.job_id)
    await first.has(1)
    hold = asyncio.Event()
    running = asyncio.create_task(run_job(worker, submitted.job_id, pause=0.02, gate=(5, hold)))
    # six lines are out, and the first ones dropped from the small buffer; the job holds
    await first.has(6, "log")
    joined = Watch(followers, submitted.job_id)
    await joined.has(6, "log")  # it joined while the job runs, and had what it missed
    hold.set()
    await running
    second = await joined.task
    assert stdout(await first.task) == stdout(second) == b"".join(LINES)
    ids = [str(e.cursor) for e in second if e.kind == "log"]
    assert len(ids) == len(set(ids)) == len(LINES)


async def test_a_slow_read_of_older_chunks_loses_none(
    logs: tuple[Log, Log], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream reading chunks older than the buffer while the buffer moves on past what it
    read: it sends what it read, then reads again from there (nothing skipped)."""
    gateway, worker = logs
    submitted = await jobs.submit(gateway, QUEUE, DEF)
    followers = Followers(gateway, poll_s=30.0, buffer_bytes=8)
    first = Watch(followers, submitted.job_id)
    await first.has(1)
    hold = asyncio.Event()
    running = asyncio.create_task(run_job(worker, submitted.job_id, pause=0.02, gate=(5, hold)))
    await first.has(6, "log")  # six lines are out, and already gone from the tiny buffer

    real_read_logs = sse.read_logs
    slowed = 0

    async def slow_read_logs(*args: Any, **kwargs: Any) -> Any:
        nonlocal slowed
        result = await real_read_logs(*args, **kwargs)  # the real read, answered late:
        if not slowed:
            slowed = len(result[0])
            hold.set()  # meanwhile the job goes on, more lines land and the buffer moves on
            await first.has(10, "log")
        return result

    monkeypatch.setattr(sse, "read_logs", slow_read_logs)
    second = await watch(followers, submitted.job_id, Cursor())
    await running
    assert slowed >= 5  # the old lines were read late, while the buffer moved on
    assert stdout(await first.task) == stdout(second) == b"".join(LINES)


async def test_streams_end_when_the_gateway_stops_following(logs: tuple[Log, Log]) -> None:
    gateway, _worker = logs
    submitted = await jobs.submit(gateway, QUEUE, DEF)
    followers = Followers(gateway, poll_s=30.0)
    stream = Watch(followers, submitted.job_id)
    await stream.has(1)
    assert [e.kind for e in stream.events][:1] == ["state"]
    await followers.close()
    with pytest.raises(LogUnavailable, match="stopped following"):
        await asyncio.wait_for(stream.task, 5)


async def test_many_queue_streams_share_one_reader(logs: tuple[Log, Log]) -> None:
    gateway, worker = logs
    followers = Followers(gateway, poll_s=30.0)
    first = [await jobs.submit(gateway, QUEUE, {**DEF, "command": f"echo {i}"}) for i in range(3)]
    reads = CountingReads(gateway)
    expected = {s.job_id for s in first}

    async def listen(after: int, opened: asyncio.Event) -> dict[str, list[str]]:
        seen: dict[str, list[str]] = {}
        async with (
            asyncio.timeout(30),
            contextlib.aclosing(queue_events(followers, QUEUE, after)) as events,
        ):
            async for ev in events:
                opened.set()
                if ev.kind == "job" and ev.job is not None:
                    seen.setdefault(ev.job.job_id, []).append(ev.job.state)
                done = {j for j, states in seen.items() if states[-1] == "finished"}
                if len(seen) == 5 and done == expected:
                    return seen
        raise AssertionError("the stream ended")

    opened = [asyncio.Event() for _ in range(20)]
    streams = [asyncio.create_task(listen(0, o)) for o in opened]
    async with asyncio.timeout(30):  # every stream is open (it sent its first event)
        for o in opened:
            await o.wait()
    assert len(followers) == 1
    more = [await jobs.submit(gateway, QUEUE, {**DEF, "command": f"echo {i}"}) for i in (3, 4)]
    for submitted in first:
        lease = await take_job(worker, submitted.job_id)
        await lease.start()
        await lease.finish({"reason": "success", "exit_code": 0})
    results = await asyncio.gather(*streams)
    everyone = expected | {s.job_id for s in more}
    for seen in results:
        assert set(seen) == everyone
        for job_id in expected:
            assert seen[job_id][-1] == "finished"
    # one reader for the 20 streams: ~15 changes, a read each (20 streams reading on their
    # own make 300 or more)
    assert reads.calls < 60, reads.calls
    assert len(followers) == 0  # the last stream to leave stopped the reader

    # a stream resuming after the last change it had gets only what changed since
    last = max(st.last_seq for st in (await jobs.list_jobs(gateway, QUEUE)))
    lease = await take_job(worker, more[0].job_id)
    async with (
        asyncio.timeout(30),
        contextlib.aclosing(queue_events(followers, QUEUE, last)) as events,
    ):
        async for ev in events:
            assert ev.kind == "workers" or (ev.job is not None and ev.job.job_id == more[0].job_id)
            if ev.job is not None:
                assert ev.job.state == "running" and ev.job.last_seq > last
                break
    await lease.finish({"reason": "success", "exit_code": 0})


async def test_a_queue_read_that_fails_midway_applies_nothing_twice(
    logs: tuple[Log, Log], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The log goes away between the read of the queue's events and the read of its workers:
    the retry must not fold the same events a second time."""
    gateway, worker = logs
    followers = Followers(gateway, poll_s=30.0)
    submitted = await jobs.submit(gateway, QUEUE, DEF)
    armed = False
    failed = asyncio.Event()
    real_list_workers = follow.list_workers

    async def flaky_list_workers(*args: Any, **kwargs: Any) -> Any:
        nonlocal armed
        if armed:  # the outage, once (timing it with a real restart is not repeatable)
            armed = False
            failed.set()
            raise LogUnavailable("test: the log is away")
        return await real_list_workers(*args, **kwargs)

    monkeypatch.setattr(follow, "list_workers", flaky_list_workers)
    streamed: list[JobState] = []
    opened = asyncio.Event()

    async def listen() -> None:
        async with contextlib.aclosing(queue_events(followers, QUEUE, 0)) as events:
            async for ev in events:
                if ev.job is not None:
                    streamed.append(ev.job)
                    opened.set()
                    if ev.job.state == "queued" and len(ev.job.history) > 1:
                        return

    task = asyncio.create_task(listen())
    async with asyncio.timeout(30):
        await opened.wait()  # the follower read the queue once, whole
    armed = True
    lease = await take_job(worker, submitted.job_id)
    async with asyncio.timeout(30):
        await failed.wait()  # the claim was read, and the read of the workers failed
    await lease.release()
    await asyncio.wait_for(task, 10)
    truth = await jobs.read_job(gateway, QUEUE, submitted.job_id)
    assert truth is not None and not armed
    assert [h.seq for h in streamed[-1].history] == [h.seq for h in truth.history]
    assert streamed[-1].rejected == truth.rejected == 0
