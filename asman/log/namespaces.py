"""Namespaces: one live job per namespace, the newest submission wins (compute-queues §3.4).

A job is held by namespaces (``JobState.holds``, folded from ``submitted``, ``hold`` and
``requeued`` events on the job's own subject, each naming the signer's namespace, ``_`` by
default). ``submit`` holds the job for its namespace and finds the queue's other live jobs
that this peer holds for the same one; each of them is *replaced*: this peer releases the
namespace from it (a ``cancel`` naming the namespace and ``replaced_by``), and a job no
namespace holds any more ends ``cancelled``, which compute-queues' views call
``JobReplacedByClient``. The default namespace ``_`` replaces nothing, as in compute-queues.

A namespace belongs to the keys that hold it: a submission replaces only what its own key
holds for that name, so through one gateway (one key) namespaces behave as compute-queues'
shared names, and nobody else's submission can end your job.

The release waits a grace that grows with the replaced job's age (``ReplaceGrace``,
compute-queues' values: none up to 20 s, 4 s past 20 s, 8 s past a minute), so that a job
whose inputs are still settling is replaced at once and a long one is not killed by a
flurry of resubmissions. There is no server to keep a timer: the submitting peer waits the
grace and releases (``replace``, or a ``Replacer`` for a long-lived peer such as the
gateway). A peer that dies in the grace leaves the older job held; the next submission in
that namespace replaces it.

A release that finishes a job (one still queued: no worker will) is the releasing peer's
event, so that peer sends the job's ``finished`` callback: ``on_finished`` is called with the
job's state (``asman.peer.callbacks`` sends; this layer knows nothing of HTTP).

Newest is the order of the stream: of two holds of one name by one key, the one with the
higher sequence. Two concurrent submissions each see the other (each looks after its own
hold is on the log), and both agree which is older, so exactly one job is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from asman.errors import AsmanError
from asman.log import jobs, subjects, wire
from asman.log.connection import Log
from asman.log.events import DEFAULT_NAMESPACE, Hold, JobState, now_ms

__all__ = [
    "DEFAULT_GRACE",
    "OnFinished",
    "ReplaceGrace",
    "Replacement",
    "Replacer",
    "live_jobs",
    "replace_now",
    "submit",
]

logger = logging.getLogger(__name__)

#: live jobs read at once when looking for a namespace's other jobs
READ_CONCURRENCY = 16

OnFinished = Callable[[JobState], object]
"""Called with a job's state when this peer's release finished it (it was still queued);
what it returns is ignored."""


@dataclass(frozen=True, slots=True)
class ReplaceGrace:
    """How long a job replaced in its namespace keeps running, by its age (compute-queues'
    ``getDeletionDelayForNamespaceSupersededJob``): ``steps`` are (older than ms, wait ms),
    the first that applies wins; a job no step applies to is released at once."""

    steps: tuple[tuple[int, int], ...] = ((60_000, 8_000), (20_000, 4_000))

    def delay_ms(self, age_ms: int) -> int:
        for older, wait in self.steps:
            if age_ms > older:
                return wait
        return 0


DEFAULT_GRACE = ReplaceGrace()


@dataclass(frozen=True, slots=True)
class Replacement:
    """Job ``job_id`` of ``queue``, held by this peer for ``namespace``, is replaced by job
    ``by``: released after ``delay_ms``."""

    queue: str
    job_id: str
    namespace: str
    by: str
    delay_ms: int
    #: the sequence of this peer's hold it replaces (held again since: left as it is)
    hold_seq: int | None = None

    @property
    def message(self) -> str:
        return f"replaced in namespace {self.namespace!r} by job {self.by}"


async def live_jobs(log: Log, queue: str) -> list[JobState]:
    """The queue's unfinished jobs: those its waiting index lists as waiting or running
    (one read of the index), each read and verified from its own subject."""
    entries = await log.read_subject(subjects.WAITING_STREAM, subjects.waiting_filter(queue))
    ids: dict[str, None] = {}
    for ev in entries:
        key = subjects.waiting_key(ev.subject)
        entry = wire.parse_entry(ev.data) if ev.data else None
        if key is not None and key[0] == queue and entry and entry.kind != wire.ENTRY_DONE:
            ids[key[2]] = None
    limit = asyncio.Semaphore(READ_CONCURRENCY)

    async def read(job: str) -> JobState | None:
        async with limit:
            return await jobs.read_job(log, queue, job)

    async with asyncio.TaskGroup() as tg:
        reads = [tg.create_task(read(job)) for job in ids]
    return [s for task in reads if (s := task.result()) is not None and not s.finished]


async def _held(log: Log, queue: str, namespace: str, exclude: str) -> list[tuple[JobState, Hold]]:
    """The queue's live jobs (but ``exclude``) this peer holds for ``namespace``."""
    me = log.peer_id
    return [
        (s, h)
        for s in await live_jobs(log, queue)
        if s.job_id != exclude and (h := s.hold_of(me, namespace)) is not None
    ]


async def submit(
    log: Log,
    queue: str,
    definition: Mapping[str, Any],
    *,
    namespace: str | None = None,
    rerun: bool = False,
    via: str = "",
    grace: ReplaceGrace = DEFAULT_GRACE,
    signed: jobs.SignedEvent | None = None,
    control: Mapping[str, Any] | None = None,
) -> jobs.Submitted:
    """``jobs.submit`` held for ``namespace``, and the live jobs of the queue this peer holds
    for the same namespace that must go (``Submitted.replacing``, each with its grace):
    every one but the newest hold, which is this submission's unless a newer one came
    meanwhile (then this very job may be among them). A cached result replaces nothing,
    as in compute-queues. Nothing is released here: ``replace_now`` or a ``Replacer``
    does it. ``control`` goes with the job (``jobs.submit``; its namespace and
    ``namespace`` are one)."""
    sub = await jobs.submit(
        log,
        queue,
        definition,
        rerun=rerun,
        via=via,
        namespace=namespace,
        signed=signed,
        control=control,
    )
    ns = sub.namespace
    if ns == DEFAULT_NAMESPACE or sub.cached:
        return sub
    others = await _held(log, queue, ns, sub.job_id)
    mine = sub.hold
    if mine is not None and not sub.held_now and any(h.seq > mine.seq for _, h in others):
        # held for the namespace before another of our jobs: this submission is the newest
        # intent, so its hold must become the newest
        state = await jobs.hold(log, queue, sub.job_id, ns, again=True)
        if state.state == "queued":
            await jobs.mark_waiting(
                log,
                queue,
                state.job_class,
                sub.job_id,
                state.last_seq,
                **jobs.entry_hints(state.definition),
            )
        mine = state.hold_of(log.peer_id, ns)
        sub = replace(sub, state=state, hold=mine, held_now=mine is not None)
    held = [*others, *([(sub.state, mine)] if mine is not None else [])]
    if not held:
        return sub
    newest = max(held, key=lambda pair: pair[1].seq)[0].job_id
    now = now_ms()
    replacing = tuple(
        Replacement(queue, s.job_id, ns, newest, grace.delay_ms(now - s.submitted_ms), h.seq)
        for s, h in held
        if s.job_id != newest
    )
    for r in replacing:
        logger.info(
            "job=%s queue=%s namespace=%s replaced by=%s in_ms=%d",
            r.job_id,
            queue,
            ns,
            r.by,
            r.delay_ms,
        )
    return replace(sub, replacing=replacing)


async def _release(
    log: Log, r: Replacement, on_finished: OnFinished | None = None
) -> JobState | None:
    """Release ``r``'s namespace from its job; None when that could not be done (logged):
    the hold went already, the log is away. The next submission in the namespace tries
    again. ``on_finished`` gets the job when this very release finished it."""
    try:
        if on_finished is not None:
            before = await jobs.read_job(log, r.queue, r.job_id)
            if before is None or before.finished:
                return before
        state = await jobs.cancel(
            log,
            r.queue,
            r.job_id,
            r.message,
            namespace=r.namespace,
            replaced_by=r.by,
            hold_seq=r.hold_seq,
        )
    except AsmanError as exc:
        logger.warning("job=%s queue=%s not replaced: %s", r.job_id, r.queue, exc)
        return None
    if on_finished is not None and state.result is not None and state.result.worker == log.peer_id:
        on_finished(state)
    return state


async def replace_now(
    log: Log, replacements: Sequence[Replacement], on_finished: OnFinished | None = None
) -> list[JobState | None]:
    """Wait each replacement's grace and release it (all at once); the jobs' states after.
    ``on_finished`` gets each job a release finished."""

    async def one(r: Replacement) -> JobState | None:
        await asyncio.sleep(r.delay_ms / 1000)
        return await _release(log, r, on_finished)

    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(one(r)) for r in replacements]
    return [t.result() for t in tasks]


class Replacer:
    """Releases replaced jobs in the background, each after its grace, for a peer that
    answers before they are done (the gateway). It owns its tasks: ``close`` cuts the
    graces still running short and waits for every release (a replacement done early rather
    than lost), so it is called before the log closes. ``on_finished`` gets each job a
    release finished (the gateway sends its ``finished`` callback)."""

    def __init__(self, log: Log, on_finished: OnFinished | None = None) -> None:
        self.log = log
        self.on_finished = on_finished
        self._tasks: set[asyncio.Task[None]] = set()
        self._hurry = asyncio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        """Replacements scheduled and not done yet."""
        return len(self._tasks)

    def schedule(self, replacements: Sequence[Replacement]) -> None:
        if self._closed:
            raise RuntimeError("the Replacer is closed")
        loop = asyncio.get_running_loop()
        for r in replacements:
            task = loop.create_task(self._one(r), name=f"replace-{r.job_id[:12]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        self._closed = True
        self._hurry.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _one(self, r: Replacement) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(r.delay_ms / 1000):
                await self._hurry.wait()
        await _release(self.log, r, self.on_finished)
