"""One reader per watched job or queue, shared by every event stream that watches it.

A job stream needs, on each change of its job: the job's verified history, its new log
chunks, and (while it is queued) the queue's live workers, to say why it waits. Read by each
stream, a job watched by N browsers costs N times those reads per change. A ``JobFollower``
reads them once for all: it wakes on the job's subjects (and after a reconnect, and every
``poll_s``), reads, and tells its watchers; each watcher only picks, from the follower's
snapshot, what its own client has not had yet (``asman.gateway.sse.job_events``).

The follower keeps the log chunks it read in a buffer bounded to ``buffer_bytes`` (the oldest
messages go first). A watcher that needs chunks older than the buffer (a browser that joins a
long job late, or resumes from an old event id) reads those itself, once, from the log.

A ``QueueFollower`` does the same for a queue's stream: it reads what is new on the queue's
job subjects and the live workers once per change, and keeps each job's latest state and the
order of the changes, so each watcher sends the jobs changed after its own last event id.

``Followers`` is the gateway's registry: ``async with followers.follow_job(queue, job) as f``
(or ``follow_queue(queue)``) joins the follower, starting it for the first watcher; the last
watcher to leave stops it. A follower that failed (an error other than the log being away,
which it rides out) is replaced for the next watcher.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, cast

from asman.errors import AsmanError, LogError, LogUnavailable
from asman.gateway.views import Waiting, waiting, worker_view
from asman.log import subjects
from asman.log.connection import Log
from asman.log.events import JobFold, JobState, check_event
from asman.log.jobs import JobHistory
from asman.log.logstream import LogChunk, read_logs, writers
from asman.log.policy import PolicyView
from asman.log.workers import WorkerInfo, list_workers

__all__ = [
    "BUFFER_BYTES",
    "Follower",
    "Followers",
    "JobFollower",
    "QueueFollower",
    "Waker",
]

logger = logging.getLogger(__name__)

BUFFER_BYTES = 1024 * 1024  # log chunks kept per followed job for its watchers
CHUNK_OVERHEAD = 128  # what a buffered chunk costs besides its bytes (counted in the bound)


class Waker:
    """An event set by messages on some subjects and by reconnects; unsubscribes on close."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.event = asyncio.Event()
        self._stops: list[Callable[[], Awaitable[None]]] = []
        self._unregister: Callable[[], None] | None = None

    async def __aenter__(self) -> Waker:
        async def on_reconnect() -> None:
            self.event.set()

        self._unregister = self.log.on_reconnect(on_reconnect)
        return self

    async def watch(self, subject: str) -> None:
        self._stops.append(await self.log.wake_on(subject, self.event))

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self.event.wait()
        self.event.clear()

    async def __aexit__(self, *exc: object) -> None:
        if self._unregister is not None:
            self._unregister()
        for stop in self._stops:
            await stop()


class Follower:
    """The shared reader of one thing on the log (a job, a queue). Its snapshot changes only
    between awaits, all at once, and each change sets the event ``changed()`` returned
    before it. Subclasses say what to watch (``_subjects``) and how to read (``_read``)."""

    what = "?"

    def __init__(self, log: Log, queue: str, *, poll_s: float) -> None:
        self.log = log
        self.queue = queue
        self.poll_s = poll_s
        self.error: AsmanError | None = None
        self.done = False  # nothing more will change: finished and read, gone, or failed
        self.users = 0
        self._read_once = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"follow-{self.what[:16]}"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def changed(self) -> asyncio.Event:
        """The event the next change sets (take it before reading the snapshot)."""
        return self._changed

    async def ready(self) -> None:
        """Until the first read is in (or the follower is done)."""
        while not (self._read_once or self.done):
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _subjects(self) -> list[str]:
        raise NotImplementedError

    async def _read(self) -> bool:
        """One read; whether the snapshot changed. Sets ``done`` when nothing more will."""
        raise NotImplementedError

    async def _run(self) -> None:
        try:
            async with Waker(self.log) as waker:
                for subject in self._subjects():
                    await waker.watch(subject)
                while True:
                    try:
                        changed = await self._read()
                        self._read_once = True
                        if changed:
                            self._notify()
                    except LogUnavailable as exc:
                        logger.info("following %s: log unavailable, retrying: %s", self.what, exc)
                        await waker.wait(min(self.poll_s, 1.0))
                        continue
                    if self.done:
                        return
                    await waker.wait(self.poll_s)
        except AsmanError as exc:
            self.error = exc
        except asyncio.CancelledError:
            # stopped (the last watcher left, or the gateway closes): a watcher still here
            # ends its stream with this rather than wait for a change that will not come
            self.error = LogUnavailable(f"the gateway stopped following {self.what}; reconnect")
            raise
        except Exception as exc:  # a bug: the watchers get an error rather than hang
            logger.exception("following %s failed", self.what)
            self.error = LogError(f"following {self.what} failed: {type(exc).__name__}")
        finally:
            self.done = True
            self._notify()


class JobFollower(Follower):
    """The shared reader of one job: ``state``, the buffered ``chunks`` with ``base_seq`` ≤
    their sequences < ``log_next``, and ``waiting``."""

    def __init__(
        self, log: Log, queue: str, job: str, *, poll_s: float, buffer_bytes: int = BUFFER_BYTES
    ) -> None:
        super().__init__(log, queue, poll_s=poll_s)
        self.job = job
        self.what = f"job {job}"
        self.buffer_bytes = buffer_bytes
        self.history = JobHistory(log, queue, job)  # each event read and verified once
        self.state: JobState | None = None
        self.log_next = 1  # the next log sequence to read
        self.base_seq = 1  # every chunk from here to ``log_next`` is in ``chunks``
        self.chunks: collections.deque[LogChunk] = collections.deque()
        self.waiting: Waiting | None = None
        self._bytes = 0

    def _subjects(self) -> list[str]:
        return [self.history.subject, subjects.logs_subject(self.queue, self.job)]

    def chunks_from(self, seq: int) -> list[LogChunk]:
        """The buffered chunks from log sequence ``seq`` on, oldest first (a watcher that
        is caught up costs only what is new)."""
        out = []
        for chunk in reversed(self.chunks):
            if chunk.seq < seq:
                break
            out.append(chunk)
        out.reverse()
        return out

    def _buffer(self, chunks: list[LogChunk]) -> None:
        self.chunks.extend(chunks)
        self._bytes += sum(len(c.data) + CHUNK_OVERHEAD for c in chunks)
        while self._bytes > self.buffer_bytes and self.chunks:
            first = self.chunks[0].seq  # drop whole log messages, oldest first
            while self.chunks and self.chunks[0].seq == first:
                self._bytes -= len(self.chunks.popleft().data) + CHUNK_OVERHEAD
            self.base_seq = first + 1

    async def _read(self) -> bool:
        """One read of the job, its new log chunks and why it waits; whether it changed."""
        state = await self.history.read()
        if state is None:
            self.done = True  # the job is gone (expired)
            return True
        chunks, cursor = await read_logs(self.log, state, self.log_next)
        if cursor > self.log_next:
            # a chunk is kept only if its writer's claim is in `state`: a claim that landed
            # after `state` was read hides its chunks, so read them again
            newer = await self.history.read()
            if newer is not None and newer.last_seq > state.last_seq:
                if writers(newer) != writers(state):
                    chunks, cursor = await read_logs(self.log, newer, self.log_next)
                state = newer
        now: Waiting | None = None
        if state.state == "queued":
            now = waiting(state, await list_workers(self.log, self.queue))
        changed = (
            not self._read_once
            or cursor != self.log_next
            or self.state is None
            or state.last_seq != self.state.last_seq
            or now != self.waiting
        )
        # the whole snapshot changes at once, with no await in between
        self._buffer(chunks)
        self.log_next = cursor
        self.state = state
        self.waiting = now
        self.done = state.finished
        return changed


class QueueFollower(Follower):
    """The shared reader of one queue: every job's latest state (``states``, by subject), the
    order in which they changed (``changes_after``), and the live ``workers`` (``workers_version``
    grows when they change)."""

    def __init__(self, log: Log, queue: str, *, poll_s: float) -> None:
        super().__init__(log, queue, poll_s=poll_s)
        self.what = f"queue {queue}"
        self.filter = subjects.jobs_filter(queue)
        self.next_seq = 1
        self.states: dict[str, JobState] = {}
        self.workers: tuple[WorkerInfo, ...] = ()
        self.workers_version = 0
        self._folds: dict[str, JobFold] = {}  # each job's verified history, folded
        self._order: list[int] = []  # the last sequence of each change, increasing
        self._order_subjects: list[str] = []
        self._shown: list[dict[str, Any]] | None = None
        #: the queue's policy the jobs are folded under (None: an open queue)
        self.policy: PolicyView | None = None

    def _subjects(self) -> list[str]:
        return [self.filter]

    def changes_after(self, seq: int) -> list[JobState]:
        """The jobs whose latest event is after ``seq``, oldest change first."""
        start = bisect.bisect_right(self._order, seq)
        out = []
        for last, subject in zip(self._order[start:], self._order_subjects[start:], strict=True):
            state = self.states[subject]
            if state.last_seq == last:  # else it changed again: listed further on
                out.append(state)
        return out

    async def _read(self) -> bool:
        policy = await self.log.policies.get(self.queue)
        refold = (policy.version if policy else 0) != (self.policy.version if self.policy else 0)
        start = 1 if refold else self.next_seq  # a new policy: every job is folded again
        new = await self.log.read_subject(subjects.JOBS_STREAM, self.filter, start)
        workers = await list_workers(self.log, self.queue)
        shown = [{**worker_view(w), "heartbeatMs": 0} for w in workers]
        # the whole snapshot changes at once, with no await from here on: a read that fails
        # (the log away) leaves nothing half-applied, and the retry reads the same events
        touched: dict[str, JobFold] = {}
        if refold:
            self.policy = policy
            self._folds.clear()
            self.next_seq = 1
        for ev in new:
            if ev.seq < self.next_seq:
                continue
            self.next_seq = ev.seq + 1
            job_fold = self._folds.get(ev.subject)
            if job_fold is None:
                if subjects.is_policy_subject(ev.subject):
                    continue
                try:
                    q, jid = subjects.job_id_from_subject(ev.subject)
                except AsmanError as exc:  # not one of ours: never let it stop the stream
                    logger.warning("queue %s: skipping seq %d: %s", self.queue, ev.seq, exc)
                    continue
                job_fold = self._folds[ev.subject] = JobFold(
                    q, jid, ev.subject, self.log.rules, self.policy
                )
            job_fold.add(check_event(ev, ev.subject))  # each event verified once
            touched[ev.subject] = job_fold
        changed: list[tuple[str, JobState]] = []
        for subject, job_fold in touched.items():
            state = job_fold.state()
            known = self.states.get(subject)
            if state is not None and (
                known is None or state.last_seq > known.last_seq or (refold and state != known)
            ):
                changed.append((subject, state))
        for subject, state in sorted(changed, key=lambda item: item[1].last_seq):
            self.states[subject] = state
            self._order.append(state.last_seq)
            self._order_subjects.append(subject)
        if len(self._order) > 2 * len(self.states) + 1024:  # drop superseded changes
            latest = sorted(self.states.items(), key=lambda item: item[1].last_seq)
            self._order = [state.last_seq for _, state in latest]
            self._order_subjects = [subject for subject, _ in latest]
        workers_changed = shown != self._shown
        if workers_changed:
            self._shown = shown
            self.workers = tuple(workers)
            self.workers_version += 1
        return not self._read_once or bool(changed) or workers_changed


F = TypeVar("F", bound=Follower)


class Followers:
    """The gateway's followers: one per watched job, one per watched queue."""

    def __init__(self, log: Log, *, poll_s: float, buffer_bytes: int = BUFFER_BYTES) -> None:
        self.log = log
        self.poll_s = poll_s
        self.buffer_bytes = buffer_bytes
        self._live: dict[tuple[str, ...], Follower] = {}

    def __len__(self) -> int:
        return len(self._live)

    def follow_job(
        self, queue: str, job: str
    ) -> contextlib.AbstractAsyncContextManager[JobFollower]:
        """``async with followers.follow_job(q, id) as f``: f is the job's ``JobFollower``."""
        return self._follow(
            ("job", queue, job),
            lambda: JobFollower(
                self.log, queue, job, poll_s=self.poll_s, buffer_bytes=self.buffer_bytes
            ),
        )

    def follow_queue(self, queue: str) -> contextlib.AbstractAsyncContextManager[QueueFollower]:
        """``async with followers.follow_queue(q) as f``: f is the queue's ``QueueFollower``."""
        return self._follow(
            ("queue", queue), lambda: QueueFollower(self.log, queue, poll_s=self.poll_s)
        )

    @contextlib.asynccontextmanager
    async def _follow(self, key: tuple[str, ...], make: Callable[[], F]) -> AsyncIterator[F]:
        # the key's first part names the kind, so what is stored under it is an F
        follower = cast("F | None", self._live.get(key))
        if follower is None or follower.error is not None:
            follower = make()
            self._live[key] = follower
            follower.start()
        follower.users += 1
        try:
            yield follower
        finally:
            follower.users -= 1
            if follower.users == 0:
                if self._live.get(key) is follower:
                    del self._live[key]
                await follower.stop()

    async def close(self) -> None:
        live, self._live = list(self._live.values()), {}
        for follower in live:
            await follower.stop()
