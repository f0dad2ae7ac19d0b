"""Finding waiting jobs and holding leases: how a worker takes a job, keeps it, and
finishes it, with no consumer per queue (docs/architecture.md, "Claim path").

**Finding work.** Each unfinished job has one entry in the waiting index (``ASMAN_WAITING``,
``asman.waiting.<queue>.<class>.<job id>``; the stream keeps the last message of a subject):
``w <seq>`` while it waits, ``r <seq> <holder>`` while it runs, ``d`` (with a one-second TTL)
once finished. A worker reads its queues' entries once (``WaitingIndex.scan``: batched direct
gets of one subject filter) and then follows them live on a core NATS subscription, which is
cheap and leaves nothing on the server. The number of queues costs the server subjects, not
consumers. An entry is only a hint: nothing is believed until the job's own subject says so.

**Claiming** (``claim``). A waiting job is claimed by compare-and-set on its last sequence
(the hint, read at the same time: one round trip). A job held by a worker that is gone (no
heartbeat, or one that no longer lists the job) or past its life is *challenged*: the claim
lands on top of the holder's, the holder has ``Rules.lease_ms`` of server time to answer, and
past that the challenger's ``renewed`` takes the lease over (``asman.log.events``).

**Holding** (``JobLease``). A healthy holder writes nothing to keep its lease: its heartbeat
says it is alive. While the job runs, its watcher answers a challenge with ``renewed`` at
once. ``started`` and ``finished`` are compare-and-sets on the holder's own last event; a
``finished`` that finds a cancel request on its claim becomes ``cancelled``; one that finds
the lease gone raises ``LeaseLost`` and the result is discarded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from asman.errors import Conflict, LeaseLost, LogError
from asman.log import subjects, wire
from asman.log.connection import DONE_TTL, READ_BATCH, Log
from asman.log.events import CheckedEvent, JobState, Lease, now_ms
from asman.log.jobs import CAS_RETRIES, JobHistory, entry_hints, mark_waiting
from asman.log.policy import worker_standing
from asman.log.workers import WorkerInfo, list_workers

__all__ = [
    "Candidate",
    "JobLease",
    "WaitingIndex",
    "by_process",
    "claim",
    "finish_lost",
    "holder_alive",
    "young",
]

logger = logging.getLogger(__name__)

#: How many waiting jobs of a queue a worker keeps in view (the oldest).
WINDOW = 256
#: A scan reads the index in batches of this many entries (one direct-get batch)...
SCAN_BATCH = READ_BATCH
#: ...and at most this many in all (running jobs' entries, older than the waiting ones, are
#: read on the way)
SCAN_LIMIT = 8192
#: A claim this young is not challenged for want of a heartbeat (the holder may not have
#: beaten yet): the heartbeats' max age, the longest a live worker goes unseen.
HEARTBEAT_TTL_MS = 30_000
#: A heartbeat written this long after a claim must list the job, or its writer does not
#: run it (it lost it, or crashed its job task).
HEARTBEAT_MARGIN_MS = 2000
#: A challenger past the grace whose ``renewed`` came a little early (clocks of a cluster's
#: leaders differ) tries again this often.
TAKEOVER_RETRY_S = 0.2


@dataclass(slots=True)
class Candidate:
    """A job the waiting index says needs a worker (or is held by one)."""

    queue: str
    job_class: str
    job_id: str
    entry: wire.Entry
    order: int  # index stream sequence when scanned, else the order it was heard in
    ts: int | None = None  # server time of the entry, when scanned
    #: the entry says the job waits (set from ``entry``)
    waiting: bool = field(init=False, default=False)
    #: when this worker first saw the entry (monotonic)
    seen: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        self.waiting = self.entry.kind == wire.ENTRY_WAITING
        self.seen = time.monotonic()


_heard = itertools.count(1 << 62)  # live entries sort after every scanned one


class WaitingIndex:
    """One queue's waiting index as a worker sees it: a scan, then live updates.

    ``entries`` maps job id to the latest entry of the queue's unfinished jobs, within a
    window: the scan reads the index oldest first and stops once it holds ``window`` waiting
    jobs, and live entries beyond the window are not kept (``more`` says there are some). A
    deep queue (100,000 waiting jobs) so costs a worker a bounded read and bounded memory,
    and its oldest jobs go first. ``wake`` is set on every live change, so the worker's
    dispatcher sleeps until there is something to do.
    """

    def __init__(self, log: Log, queue: str, wake: asyncio.Event, *, window: int = WINDOW) -> None:
        self.log = log
        self.queue = subjects.validate_queue(queue)
        self.wake = wake
        self.window = window
        self.more = False  # waiting entries exist beyond the window: rescan when it drains
        self.entries: dict[str, Candidate] = {}
        self._waiting = 0
        self.workers: dict[tuple[str, str], WorkerInfo] = {}  # by (key, process)
        self._stop: Callable[[], Awaitable[None]] | None = None
        self.scanned_at = 0.0  # monotonic time of the last scan
        self.workers_at = 0.0  # monotonic time of the last read of the heartbeats

    async def open(self) -> WaitingIndex:
        self._stop = await self.log.on_message(subjects.waiting_filter(self.queue), self._on_entry)
        return self

    async def close(self) -> None:
        stop, self._stop = self._stop, None
        if stop is not None:
            await stop()

    def _on_entry(self, subject: str, data: bytes) -> None:
        key = subjects.waiting_key(subject)
        entry = wire.parse_entry(data)
        if key is None or entry is None or key[0] != self.queue:
            return
        self._put(key[1], key[2], entry, next(_heard), None)
        self.wake.set()

    @property
    def waiting_count(self) -> int:
        return self._waiting

    def _put(self, job_class: str, job: str, entry: wire.Entry, order: int, ts: int | None) -> None:
        old = self.entries.get(job)
        if old is not None and old.entry == entry:
            return  # the same hint again: keep its place in line
        if old is not None:
            del self.entries[job]
            self._waiting -= old.waiting
        if entry.kind == wire.ENTRY_DONE:
            return
        if entry.kind == wire.ENTRY_WAITING and self._waiting >= self.window:
            self.more = True  # beyond the window: the next scan brings it in turn
            return
        cand = Candidate(self.queue, job_class, job, entry, order, ts)
        self.entries[job] = cand
        self._waiting += cand.waiting

    async def scan(self) -> None:
        """Read the queue's entries, oldest first, batch by batch until the window is full
        (one round trip for a queue of a few hundred jobs), and the live heartbeats."""
        started = next(_heard)  # live entries heard from now on are newer than the scan
        heard = {j: c for j, c in self.entries.items() if c.order > started}
        self.entries, self._waiting, self.more = {}, 0, False
        seq, read = 1, 0
        while True:
            batch = await self.log.read_subject(
                subjects.WAITING_STREAM, subjects.waiting_filter(self.queue), seq, max_messages=1
            )
            for ev in batch:
                key = subjects.waiting_key(ev.subject)
                entry = wire.parse_entry(ev.data) if ev.data else None
                if key is not None and entry is not None:
                    self._put(key[1], key[2], entry, ev.seq, ev.ts)
            read += len(batch)
            if len(batch) < SCAN_BATCH:
                break  # the end of the index
            if self._waiting >= self.window or read >= SCAN_LIMIT:
                self.more = True
                break
            seq = batch[-1].seq + 1
        for job, cand in heard.items():  # newer than what the scan read
            self._put(cand.job_class, job, cand.entry, cand.order, cand.ts)
        await self.refresh_workers()
        self.scanned_at = time.monotonic()

    async def refresh_workers(self) -> None:
        """Read the queue's live heartbeats (``workers``) again."""
        self.workers = by_process(await list_workers(self.log, self.queue))
        self.workers_at = time.monotonic()

    def forget(self, job: str) -> None:
        old = self.entries.pop(job, None)
        if old is not None:
            self._waiting -= old.waiting


def by_process(workers: list[WorkerInfo]) -> dict[tuple[str, str], WorkerInfo]:
    return {(w.worker_id, w.proc): w for w in workers}


def holder_alive(
    state: JobState,
    workers: dict[tuple[str, str], WorkerInfo],
    heartbeat_ttl_ms: int = HEARTBEAT_TTL_MS,
) -> bool:
    """Whether the holder of ``state``'s lease looks alive: it has a live heartbeat, and a
    heartbeat written well after the claim lists the job. A holder without a heartbeat counts
    as alive for one heartbeat TTL after its claim (a worker that just started may not have
    beaten yet, or its first beat not reached us). A lease past its life counts as not
    alive: it may be challenged whatever the heartbeat says."""
    lease = state.lease
    if lease is None:
        return False
    now = now_ms()
    if lease.expired(now):
        return False
    info = workers.get((lease.worker, lease.proc))
    if info is None:
        return lease.claimed_ms is None or now < lease.claimed_ms + heartbeat_ttl_ms
    if state.job_id in info.running:
        return True
    if lease.claimed_ms is None or info.seen_ms is None:
        return True  # cannot tell: leave it
    return info.seen_ms < lease.claimed_ms + HEARTBEAT_MARGIN_MS


class JobLease:
    """A worker's live claim on one attempt of one job.

    The lease keeps the job's verified history (``JobHistory``): each event is read and
    verified once, and our own fenced appends are recorded first-hand, so ``check`` reads
    only what others appended since and ``start``/``finish`` need no read back.
    """

    def __init__(
        self,
        log: Log,
        state: JobState,
        history: JobHistory,
    ) -> None:
        assert state.lease is not None
        self.log = log
        self.queue = state.queue
        self.job_id = state.job_id
        self.job_class = state.job_class
        self.state = state
        self.attempt = state.lease.attempt
        self.claim_seq = state.lease.claim_seq
        self.last_seq = state.last_seq
        self.history = history
        self.subject = history.subject
        self.done = False
        self.announced = False

    @property
    def spent(self) -> bool:
        """This attempt is past the allowed number: the job may only end ``worker_lost``."""
        return self.attempt > self.log.rules.max_attempts

    def _ours(self, state: JobState | None) -> JobState:
        if (
            state is None
            or state.lease is None
            or not state.lease.held_by(self.log.peer_id, self.log.session)
            or state.lease.attempt != self.attempt
        ):
            holder = state.lease.worker[:12] if state and state.lease else "nobody"
            raise LeaseLost(
                self.queue,
                self.job_id,
                f"lease on job {self.job_id} attempt {self.attempt} was lost "
                f"(now held by {holder})",
            )
        return state

    def is_own(self, data: bytes) -> bool:
        """Whether ``data`` is an envelope this lease appended (the claim included): a
        watcher need not re-read the job for its own events."""
        return data in self.history.mine

    async def announce(self) -> None:
        """Tell the waiting index the job runs (a hint, not waited for; once)."""
        if self.announced:
            return
        self.announced = True
        subject = subjects.waiting_subject(self.queue, self.job_class, self.job_id)
        with contextlib.suppress(LogError):
            await self.log.publish_entry(
                subject,
                wire.running_entry(self.claim_seq, self.log.peer_id, self.log.session),
                wait=False,
            )

    async def check(self) -> JobState:
        """Read what was appended to the job since; answer a challenge at once. Raises
        LeaseLost when the lease is no longer ours."""
        state = self._ours(await self.history.read())
        self.last_seq = state.last_seq
        self.state = state
        lease = state.lease
        if lease is not None and lease.challenge is not None:
            logger.info("job=%s challenged by %s: answering", self.job_id, lease.challenge.by[:12])
            state = await self._append_fenced(
                {"type": "renewed", "ts": now_ms(), "proc": self.log.session}
            )
        return state

    async def _append(self, event: dict[str, Any], *, ending: bool = False) -> JobState:
        """One fenced append on our last known sequence; Conflict if someone wrote first.
        LeaseLost when the job's log did not take it (the fold refused it), or, unless the
        event ends our lease (``ending``), when the lease is no longer ours after it."""
        expected = self.last_seq
        own = await self.log.append_checked(
            self.subject, event, expected_last_seq=expected, sent=self.history.mine
        )
        state = await self.history.appended(own, expected)
        entry = None
        if state is not None:
            entry = next((h for h in reversed(state.history) if h.seq == own.seq), None)
        if state is None or entry is None or not entry.accepted:
            why = entry.note if entry is not None else "not found"
            raise LeaseLost(
                self.queue, self.job_id, f"the job's log refused our {event['type']}: {why}"
            )
        if not ending:
            state = self._ours(state)
        self.last_seq = state.last_seq
        self.state = state
        return state

    async def _append_fenced(self, event: dict[str, Any], *, ending: bool = False) -> JobState:
        for _ in range(CAS_RETRIES):
            try:
                return await self._append(event, ending=ending)
            except Conflict:
                state = self._ours(await self.history.read())
                self.last_seq = state.last_seq
        raise LeaseLost(self.queue, self.job_id, "job subject keeps changing; giving up")

    async def start(self) -> None:
        """Record that the container started."""
        await self._append_fenced(
            {"type": "started", "ts": now_ms(), "attempt": self.attempt, "proc": self.log.session}
        )

    async def finish(self, result: dict[str, Any]) -> JobState:
        """Publish ``finished`` fenced on our own last event, then mark the index entry done.

        ``result`` holds reason, exit_code, oom_killed, duration_ms, message, outputs (or
        manifest), log. When a cancel request landed on our claim, the job is finished as
        cancelled. Returns the job's state with our ``finished`` folded in.
        """
        event: dict[str, Any] = {
            **result,
            "type": "finished",
            "ts": now_ms(),
            "attempt": self.attempt,
            "proc": self.log.session,
        }
        for _ in range(CAS_RETRIES):
            if self.state.cancel_requested and event.get("reason") not in (
                "cancelled",
                "worker_lost",
            ):
                event = {**event, "reason": "cancelled", "message": "cancelled"}
            try:
                final = await self._append(event, ending=True)
            except Conflict:
                state = self._ours(await self.history.read())  # LeaseLost on a takeover
                self.last_seq = state.last_seq
                self.state = state
                continue
            self.done = True
            await self.mark_done()
            return final
        raise LeaseLost(self.queue, self.job_id, "job subject keeps changing; giving up")

    async def mark_done(self) -> None:
        """Tell the waiting index the job is finished (a hint, not waited for)."""
        subject = subjects.waiting_subject(self.queue, self.job_class, self.job_id)
        with contextlib.suppress(LogError):
            await self.log.publish_entry(subject, wire.DONE_ENTRY, ttl=DONE_TTL, wait=False)

    async def release(self) -> None:
        """Hand the job back untried (draining): ``released``, and the index says it waits,
        so another worker takes it at once; the attempt is not counted."""
        state = await self._append_fenced(
            {"type": "released", "ts": now_ms(), "attempt": self.attempt, "proc": self.log.session},
            ending=True,
        )
        self.done = True
        if state.state == "queued":
            await mark_waiting(
                self.log,
                self.queue,
                self.job_class,
                self.job_id,
                state.last_seq,
                **entry_hints(state.definition),
            )


Alive = Callable[[JobState], Awaitable[bool]]


def claim_event(log: Log) -> dict[str, Any]:
    """A ``claimed`` event of this process, with its worker certificate if it has one (a
    queue whose policy trusts certified workers)."""
    event: dict[str, Any] = {"type": "claimed", "ts": now_ms(), "proc": log.session}
    if log.cert is not None:
        event["cert"] = log.cert
    return event


async def claim(
    log: Log,
    queue: str,
    job: str,
    hint_seq: int = 0,
    *,
    alive: Alive | None = None,
    stop: asyncio.Event | None = None,
) -> JobLease | None:
    """Claim ``job``; None when there is nothing for us to do (finished, or held by a live
    worker, or taken by another worker first).

    ``hint_seq``, the job's last sequence from the waiting index, lets a waiting job be
    claimed in one round trip. ``alive(state)`` says whether the holder of a running job
    lives (default: its heartbeat, ``holder_alive``); a job whose holder does not is
    challenged, and this call waits out the grace (``Rules.lease_ms``) for an answer before
    it takes the lease over. ``stop`` cuts that wait short (None is returned).
    """
    view = await log.policies.get(queue)
    if worker_standing(view, log.peer_id, log.cert, queue, now_ms()):
        return None  # the queue's policy would ignore our claim (the dispatcher says why)
    history = JobHistory(log, queue, job)
    sent = history.mine  # our events: JobLease.is_own, and no verification when read back
    if hint_seq > 0:
        hinted = await _claim_on_hint(log, history, hint_seq, sent)
        if hinted is not None:
            return hinted
    challenged = False
    for _ in range(CAS_RETRIES):
        state = history.state() or await history.read()
        if state is None or state.finished:
            return None  # (a stale entry of a finished job: the sweep marks it done)
        lease = state.lease
        if lease is not None and lease.held_by(log.peer_id, log.session):
            return None  # ours already: another task of this worker runs it
        if lease is not None and lease.challenge is not None:
            c = lease.challenge
            if c.by != log.peer_id or c.proc != log.session:
                return None  # another worker is taking it over
            return await _take_over(log, history, sent, stop, None)
        if lease is not None and not challenged:
            is_alive = await alive(state) if alive is not None else await _alive(log, state)
            if is_alive:
                return None
        try:
            own = await log.append_checked(
                history.subject,
                claim_event(log),
                expected_last_seq=state.last_seq,
                sent=sent,
            )
        except Conflict:
            await history.read()
            continue
        acked = time.monotonic()
        challenged = lease is not None
        holder = lease.worker if lease is not None else ""
        claimed = await history.appended(own, state.last_seq)
        if claimed is not None and _refused(claimed, own.seq):
            return None  # the log does not count our claim (a policy changed under us)
        if claimed is not None and claimed.lease is not None:
            if claimed.lease.claim_seq == own.seq and claimed.lease.held_by(
                log.peer_id, log.session
            ):
                logger.info("job=%s queue=%s claimed attempt=%d", job, queue, claimed.claims)
                return JobLease(log, claimed, history)
            if challenged and claimed.lease.challenge is not None:
                c = claimed.lease.challenge
                if c.by == log.peer_id and c.proc == log.session and c.seq == own.seq:
                    logger.info("job=%s queue=%s challenged %s's lease", job, queue, holder[:12])
                    return await _take_over(log, history, sent, stop, acked)
        await history.read()
    raise Conflict(f"could not claim job {job}: too many concurrent writers")


def _refused(state: JobState, seq: int) -> bool:
    entry = next((h for h in reversed(state.history) if h.seq == seq), None)
    return entry is not None and not entry.accepted


def young(log: Log, lease: Lease) -> bool:
    """A claim younger than a heartbeat's life, not past its life: its holder counts as alive
    whatever the heartbeats say (``holder_alive``), so a worker that lost the race to it
    needs to read nothing more."""
    now = now_ms()
    return not lease.expired(now) and (
        lease.claimed_ms is None or now < lease.claimed_ms + log.heartbeat_ttl_ms
    )


async def _alive(log: Log, state: JobState) -> bool:
    if state.lease is not None and young(log, state.lease):
        return True
    workers = by_process(await list_workers(log, state.queue))
    return holder_alive(state, workers, log.heartbeat_ttl_ms)


async def _claim_on_hint(
    log: Log, history: JobHistory, hint: int, sent: dict[bytes, wire.Opened]
) -> JobLease | None:
    """A waiting job whose last sequence the index names: claim by CAS on it while the
    history is read and verified, in one round trip instead of two.

    The claim is believed only when the fold of the verified history accepts it as the
    lease; None sends the caller down the read-first path (the CAS lost, or the hint was
    stale or forged, or the job is held)."""
    appending = asyncio.ensure_future(
        log.append_checked(
            history.subject,
            claim_event(log),
            expected_last_seq=hint,
            sent=sent,
        )
    )
    try:
        await history.read()
    finally:
        # never leave the append behind: its outcome decides whether we hold a claim
        own: CheckedEvent | None = None
        with contextlib.suppress(Conflict):
            own = await appending
    if own is None:
        return None
    state = await history.appended(own, hint)
    if state is None or state.lease is None or state.lease.claim_seq != own.seq:
        return None  # (our event, if it was a challenge, is handled by the caller's loop)
    if not state.lease.held_by(log.peer_id, log.session):
        return None
    logger.info("job=%s queue=%s claimed attempt=%d", state.job_id, state.queue, state.claims)
    return JobLease(log, state, history)


async def _take_over(
    log: Log,
    history: JobHistory,
    sent: dict[bytes, wire.Opened],
    stop: asyncio.Event | None,
    acked: float | None,
) -> JobLease | None:
    """We challenged the holder: wait for its answer, or for the grace to pass, then take
    the lease over with ``renewed``. None if the holder answered (or ``stop`` was set).

    The grace is counted from our challenge's acknowledgement (``acked``, monotonic) on our
    own clock: the server stamped the challenge before it acknowledged it, so a ``renewed``
    sent a grace later is stamped past the due time whatever the clocks say. Without it
    (a challenge of ours found on the log), the local clock estimates the server's."""
    wake = asyncio.Event()
    stop_sub = await log.wake_on(history.subject, wake, ignore=lambda data: data in sent)
    try:
        for _ in range(CAS_RETRIES * 4):
            state = await history.read()
            if state is None or state.finished or state.lease is None:
                return None
            lease = state.lease
            if lease.held_by(log.peer_id, log.session) and lease.challenge is None:
                return JobLease(log, state, history)
            c = lease.challenge
            if c is None or c.by != log.peer_id or c.proc != log.session:
                logger.info("job=%s the holder answered our challenge", state.job_id)
                return None
            due = lease.challenge_due_ms(history.rules)
            if due is None:
                continue  # our challenge is read back with its server time next
            grace_s = history.rules.lease_ms / 1000
            if acked is not None:
                wait_s = max(0.0, acked + grace_s - time.monotonic())
            else:
                wait_s = min(max(0.0, (due - now_ms()) / 1000), grace_s)
            wait_s += 0.05
            wake.clear()
            waiters = [asyncio.ensure_future(wake.wait())]
            if stop is not None:
                waiters.append(asyncio.ensure_future(stop.wait()))
            await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
            if stop is not None and stop.is_set():
                return None
            if wake.is_set():
                continue  # something landed: read it
            try:
                own = await log.append_checked(
                    history.subject,
                    {"type": "renewed", "ts": now_ms(), "proc": log.session},
                    expected_last_seq=state.last_seq,
                    sent=sent,
                )
            except Conflict:
                continue
            taken = await history.appended(own, state.last_seq)
            if (
                taken is not None
                and taken.lease is not None
                and taken.lease.held_by(log.peer_id, log.session)
                and taken.lease.challenge is None
            ):
                logger.info(
                    "job=%s queue=%s taken over, attempt=%d",
                    taken.job_id,
                    taken.queue,
                    taken.claims,
                )
                return JobLease(log, taken, history)
            await asyncio.sleep(TAKEOVER_RETRY_S)  # too early by the server's clock
        return None
    finally:
        await stop_sub()


async def finish_lost(lease: JobLease) -> JobState:
    """End a job whose attempts are spent (our attempt is past them): ``worker_lost``."""
    rules = lease.log.rules
    state = await lease.finish(
        {
            "reason": "worker_lost",
            "message": f"no worker finished the job in {rules.max_attempts} attempts",
        }
    )
    logger.info("job=%s queue=%s worker_lost", lease.job_id, lease.queue)
    return state
