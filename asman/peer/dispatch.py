"""Finding work for a worker's free slots, across its queues, without a consumer per queue.

The dispatcher keeps one ``WaitingIndex`` per queue (a scan, then live updates on a core
subscription) and hands the worker one candidate at a time:

* **Fair between queues**: queues take turns (round robin over those with something to do).
* **Roughly first come, first served in a queue**: the oldest entries go first; a worker picks
  at random among the few oldest, so that workers rarely collide on one job (a collision
  costs one refused compare-and-set).
* **No herd**: when several workers serve a queue, each new job has an order of preference
  among them (rendezvous hashing of the job id and each worker's key and process): the first
  takes it at once, the k-th only ``k * HERD_STEP_S`` after it saw the job, by when the
  job is usually taken (the taker says so in the index at once). Every worker sees every
  job, but only one of them usually tries it.
* **No job starved**: a job whose claim found nothing to do is skipped only until its entry
  changes (or for a short while); a rescan of each queue every ``scan_interval_s`` while idle
  (and of every queue after a reconnect) finds what a lost live message missed, and what a
  gone worker still holds (its heartbeat expired), which the claim path then challenges; a
  sweep of each queue every ``sweep_interval_s`` rewrites the index entry of any unfinished
  job that lacks one (a submitter that died before writing it, or junk).
* **Only jobs that fit**: a job whose ``requirements.memory`` is over the worker's memory
  ceiling is never claimed (run under the ceiling, it would get less than it asked for); it
  waits for a worker that allows that much. Its waiting entry says what it asks for
  (``w <seq> <memory>``), so this costs nothing per job; the entry is only a hint, so a
  "too big" is read from the job's own definition once before the job is passed by (a forged
  entry cannot hide a job), and a "fits" is checked after the claim (the worker hands a job
  that does not fit back, and it is remembered here).
* **Bounded for many queues**: scans and sweeps together run at most ``MAX_SCANS_PER_S`` a
  second, so a worker on 2,000 queues goes round them more slowly instead of loading the
  server; the first scan of every queue runs ``SCAN_CONCURRENCY`` at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from asman.errors import LogError
from asman.log import jobs, subjects, wire
from asman.log.connection import Log
from asman.log.events import now_ms
from asman.log.leases import WINDOW, Candidate, WaitingIndex
from asman.log.policy import is_owner_bound, worker_standing

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)

#: a worker picks at random among this many of a queue's oldest waiting jobs, or four per
#: slot of the queue's live workers, up to MAX_PICK_WINDOW
PICK_WINDOW = 8
MAX_PICK_WINDOW = 128
#: an idle worker scans at most this many queues a second (one on 2,000 queues goes round
#: them in 100 s rather than reading 400 queues a second)
MAX_SCANS_PER_S = 20
#: queues scanned at once
SCAN_CONCURRENCY = 16
#: a queue's heartbeats are read again when older than this at a pick
WORKERS_REFRESH_S = 5.0
#: how much later each next worker in a job's order of preference may take it
HERD_STEP_S = 0.025
#: a job is never deferred longer than this (after it, every worker may take it)
HERD_MAX_S = 0.5
#: a job whose claim found nothing to do is left alone this long if its entry stays the same
#: (a running job's entry changes from ``w`` to ``r`` a quarter second into it; one that
#: stays ``w`` is held by a worker that never said so: looked at again, it may be gone)
TRIED_HOLD_S = 5.0
#: how soon a job whose requirements could not be read (a log outage) is looked at again
NEEDS_RETRY_S = 1.0
#: how many jobs' memory requirements a dispatcher remembers
MAX_KNOWN_NEEDS = 65_536
#: how far a queue's window of waiting jobs (``WaitingIndex.window``) is widened past jobs
#: this worker does not take
MAX_SCAN_WINDOW = 4096


class Dispatcher:
    """One worker's view of its queues' waiting jobs."""

    def __init__(
        self,
        log: Log,
        queues: tuple[str, ...],
        *,
        scan_interval_s: float = 5.0,
        sweep_interval_s: float = 120.0,
        memory_bytes: int | None = None,
        labels: Iterable[str] = (),
    ) -> None:
        self.log = log
        #: this worker's labels: a job with tags runs only where every tag is one of them
        self.labels = frozenset(labels)
        #: the memory ceiling of this worker's jobs (0: none); None: the one its own
        #: heartbeat on the queue announces
        self.memory_bytes = memory_bytes
        # job id → the memory (0: nothing said) and tags its definition asks for
        self._needs: dict[str, tuple[int, tuple[str, ...]]] = {}
        self.queues = queues
        self.scan_interval_s = scan_interval_s
        self.sweep_interval_s = sweep_interval_s
        self.wake = asyncio.Event()
        self.indexes: dict[str, WaitingIndex] = {}
        self._turn = 0
        self._in_flight: set[str] = set()
        # job id → (entry it was tried with, until when): skipped while both hold
        self._tried: dict[str, tuple[wire.Entry, float]] = {}
        self._swept_at = time.monotonic()
        self._sweep_turn = 0
        self._random = random.Random()
        self._rescan_due: set[str] = set()  # queues whose window drained
        # job id → (the heartbeats view it was ranked with, its deferral)
        self._ranks: dict[str, tuple[object, float]] = {}
        self._deferred = float("inf")  # the earliest time a deferred job becomes ours
        self._unregister: Callable[[], None] = lambda: None
        #: queues whose policy does not trust this worker, with the line that says why
        self.refused: dict[str, str] = {}
        #: the queues whose name can carry a policy (the others are never looked at for one)
        self._owned = frozenset(q for q in queues if is_owner_bound(q))
        self._policy_stops: list[Callable[[], Awaitable[None]]] = []

    async def open(self) -> Dispatcher:
        for q in self.queues:
            self.indexes[q] = await WaitingIndex(self.log, q, self.wake).open()
            if q in self._owned:  # a policy change wakes the dispatcher
                self._policy_stops.append(
                    await self.log.wake_on(subjects.policy_subject(q), self.wake)
                )
        self._unregister = self.log.on_reconnect(self._reconnected)
        await self.check_policies()
        await self.rescan(self.queues)
        return self

    async def close(self) -> None:
        self._unregister()
        for index in self.indexes.values():
            await index.close()
        for stop in self._policy_stops:
            await stop()

    async def check_policies(self) -> None:
        """Which queues' policies trust this worker (cheap: a policy is read again only
        after it changed). Says once, per change, what an untrusted worker should ask."""
        for q in self._owned:
            try:
                view = await self.log.policies.get(q)
            except LogError as exc:
                logger.warning("queue %s: cannot read its policy: %s", q, exc)
                continue
            why = worker_standing(view, self.log.peer_id, self.log.cert, q, now_ms())
            if why == self.refused.get(q, ""):
                continue
            if why:
                logger.warning("%s", why)
                self.refused[q] = why
            else:
                logger.info("queue %s: its policy trusts this worker; taking its jobs", q)
                self.refused.pop(q, None)

    async def _reconnected(self) -> None:
        """Live entries may have been missed while disconnected: every queue is due for a
        scan (at the bounded rate)."""
        for index in self.indexes.values():
            index.scanned_at = 0.0
        self.wake.set()

    @property
    def scan_every_s(self) -> float:
        """How often each queue is scanned while idle: ``scan_interval_s``, or slower for a
        worker on many queues, so that it never makes more than ``MAX_SCANS_PER_S``."""
        return max(self.scan_interval_s, len(self.queues) / MAX_SCANS_PER_S)

    async def rescan(self, queues: Iterable[str]) -> None:
        """Scan these queues' indexes, a few at a time."""
        limit = asyncio.Semaphore(SCAN_CONCURRENCY)

        async def one(q: str) -> None:
            async with limit:
                try:
                    await self.indexes[q].scan()
                except LogError as exc:
                    logger.warning("scan of queue %s failed: %s", q, exc)
                    self.indexes[q].scanned_at = time.monotonic()  # try again next round

        await asyncio.gather(*(one(q) for q in queues))

    async def _idle_work(self) -> None:
        """Scans and sweeps that are due, oldest first, at most a few per call."""
        now = time.monotonic()
        every = self.scan_every_s
        due = sorted(
            (i for i in self.indexes.values() if now - i.scanned_at >= every),
            key=lambda i: i.scanned_at,
        )[:SCAN_CONCURRENCY]
        if due:
            await self.rescan([i.queue for i in due])
        sweep_every = max(self.sweep_interval_s, len(self.queues) / MAX_SCANS_PER_S)
        if now - self._swept_at >= sweep_every / max(1, len(self.queues)):
            q = self.queues[self._sweep_turn % len(self.queues)]
            self._sweep_turn += 1
            self._swept_at = now
            await self.sweep(q)

    async def sweep(self, queue: str) -> None:
        """Repair the index of ``queue``: every unfinished job gets an entry if it has none
        (the claim path then decides what it needs), and a finished job's stale entry is
        marked done. Reads every job of the queue, so each queue is swept once per
        ``sweep_interval_s`` at most."""
        index = self.indexes[queue]
        try:
            for state in await jobs.list_jobs(self.log, queue):
                listed = state.job_id in index.entries
                if state.finished and listed:
                    await jobs.mark_done(self.log, queue, state.job_class, state.job_id)
                    index.forget(state.job_id)
                    logger.info("job=%s queue=%s stale index entry removed", state.job_id, queue)
                elif not state.finished and not listed:
                    await jobs.mark_waiting(
                        self.log,
                        queue,
                        state.job_class,
                        state.job_id,
                        state.last_seq,
                        **jobs.entry_hints(state.definition),
                    )
                    logger.info("job=%s queue=%s index entry repaired", state.job_id, queue)
        except LogError as exc:
            logger.warning("sweep of %s failed: %s", queue, exc)

    def shared(self, queue: str) -> bool:
        """Whether other worker processes take from ``queue`` (their heartbeats, at the
        last scan)."""
        me = (self.log.peer_id, self.log.session)
        return any(key != me for key in self.indexes[queue].workers)

    def taken(self, cand: Candidate) -> None:
        """The worker is claiming ``cand`` now."""
        self._in_flight.add(cand.job_id)

    def done(self, cand: Candidate, *, retry_after_s: float | None = None) -> None:
        """The claim of ``cand`` is over. ``retry_after_s``: look at it again that soon
        (a log outage, busy GPUs); else it is left alone until its entry changes."""
        self._in_flight.discard(cand.job_id)
        hold = TRIED_HOLD_S if retry_after_s is None else retry_after_s
        self._tried[cand.job_id] = (cand.entry, time.monotonic() + hold)
        if retry_after_s is not None:
            self.wake.set()

    def claimed(self, cand: Candidate) -> None:
        """We hold ``cand``'s lease: it is no longer a candidate here."""
        self._in_flight.discard(cand.job_id)
        self._tried.pop(cand.job_id, None)
        self._needs.pop(cand.job_id, None)
        index = self.indexes.get(cand.queue)
        if index is not None:
            index.forget(cand.job_id)

    def _ceiling(self, index: WaitingIndex) -> int | None:
        """This worker's memory ceiling (0: none), or None while it is not known."""
        if self.memory_bytes is not None:
            return self.memory_bytes
        me = index.workers.get((self.log.peer_id, self.log.session))
        return None if me is None else me.memory_bytes

    def _asks(self, cand: Candidate) -> tuple[int, tuple[str, ...]]:
        """The memory and tags ``cand`` asks for: known from its definition, else what its
        entry says of the memory (and no tags)."""
        known = self._needs.get(cand.job_id)
        if known is not None:
            return known
        return (cand.entry.memory if cand.waiting else 0), ()

    def _why_not(self, cand: Candidate) -> str | None:
        """Why this worker does not take ``cand`` (its memory or tags), or None."""
        memory, tags = self._asks(cand)
        missing = [t for t in tags if t not in self.labels]
        if missing:
            return f"its tags {', '.join(missing)} are not among this worker's labels"
        if memory:
            ceiling = self._ceiling(self.indexes[cand.queue])
            if ceiling is None or (ceiling and memory > ceiling):
                return f"it asks for {memory} bytes of memory, over this worker's {ceiling}"
        return None

    def _fits(self, cand: Candidate) -> bool:
        return self._why_not(cand) is None

    def _unchecked(self, cand: Candidate) -> bool:
        """A job whose entry alone says it may not be for us (too big, or tagged): its
        definition is read once before it is passed by or tried (entries are hints)."""
        if cand.job_id in self._needs or not cand.waiting:
            return False
        return cand.entry.tagged or not self._fits(cand)

    async def _check_needs(self, cand: Candidate) -> None:
        """Read what ``cand``'s definition asks for."""
        try:
            state = await jobs.read_job(self.log, cand.queue, cand.job_id)
        except LogError as exc:
            logger.warning("job=%s requirements could not be read: %s", cand.job_id, exc)
            self.done(cand, retry_after_s=NEEDS_RETRY_S)  # the entry's word stands till then
            return
        self.learn(cand.job_id, state.definition if state is not None else {})
        why = self._why_not(cand)
        if why:
            logger.info("job=%s queue=%s left to another worker: %s", cand.job_id, cand.queue, why)

    def learn(self, job_id: str, definition: Mapping[str, Any]) -> None:
        """Remember what ``job_id``'s definition asks for (a job id is the hash of its
        definition: it never changes)."""
        if len(self._needs) >= MAX_KNOWN_NEEDS:
            self._needs.clear()
        self._needs[job_id] = (jobs.memory_asked(definition), jobs.tags_asked(definition))

    def _eligible(self, cand: Candidate, index: WaitingIndex, now: float) -> bool:
        if cand.job_id in self._in_flight or cand.queue in self.refused:
            return False
        tried = self._tried.get(cand.job_id)
        if tried is not None:
            if tried[0] == cand.entry and tried[1] > now:
                return False
            del self._tried[cand.job_id]
        if cand.waiting:
            return now >= cand.seen + self._deferral(cand, index)
        # running: a candidate only when its holder has no live heartbeat (gone), and the
        # entry is older than a heartbeat's life (a worker that just claimed may not have
        # beaten yet); the claim path looks again before it challenges anyone
        if (cand.entry.holder, cand.entry.proc) == (self.log.peer_id, self.log.session):
            return False
        if self._untrusted_holder(cand):
            return True  # the queue's policy ignores that claim: the job is waiting
        if (cand.entry.holder, cand.entry.proc) in index.workers or cand.ts is None:
            return False
        return now_ms() > cand.ts + self.log.heartbeat_ttl_ms

    def _untrusted_holder(self, cand: Candidate) -> bool:
        """The entry names a holder the queue's policy does not list (a hoarder's claims
        count for nothing; a certified holder may count, so it is left to the heartbeats)."""
        view = self.log.policies.known(cand.queue) if cand.queue in self._owned else None
        p = view.current if view else None
        return (
            p is not None
            and p.workers is not None
            and not p.certifiers
            and cand.entry.holder not in p.workers
        )

    def _deferral(self, cand: Candidate, index: WaitingIndex) -> float:
        """How long after seeing ``cand`` this worker leaves it to the workers that come
        before it in the job's order of preference (0 when alone on the queue)."""
        me = (self.log.peer_id, self.log.session)
        others = [key for key in index.workers if key != me]
        if not others:
            return 0.0
        cached = self._ranks.get(cand.job_id)
        if cached is not None and cached[0] is index.workers:
            return cached[1]
        mine = _rendezvous(cand.job_id, me)
        rank = sum(1 for key in others if _rendezvous(cand.job_id, key) > mine)
        delay = min(rank * HERD_STEP_S, HERD_MAX_S)
        if len(self._ranks) > 4096:
            self._ranks.clear()
        self._ranks[cand.job_id] = (index.workers, delay)
        if delay:
            self._deferred = min(self._deferred, cand.seen + delay)
        return delay

    @staticmethod
    def _window(index: WaitingIndex) -> int:
        """How many of a queue's oldest waiting jobs a pick chooses among: more when more
        workers take from the queue, so that workers woken by the same entries rarely pick
        the same one (each picks at random; a collision costs a refused compare-and-set)."""
        slots = sum(w.slots for w in index.workers.values())
        return max(PICK_WINDOW, min(4 * slots, MAX_PICK_WINDOW))

    def _pick(self, can_take: Callable[[Candidate], bool]) -> Candidate | None:
        now = time.monotonic()
        self._deferred = float("inf")
        n = len(self.queues)
        in_flight, tried = self._in_flight, self._tried
        for i in range(n):
            q = self.queues[(self._turn + i) % n]
            index = self.indexes[q]
            # entries are kept oldest first (a changed entry moves to the end), so the first
            # eligible ones are the oldest: no sort
            eligible: list[Candidate] = []
            preferred: list[Candidate] = []  # the jobs this worker comes first for
            window = self._window(index)
            shared = len(index.workers) > 1
            refused = 0  # waiting jobs this worker does not take (too big for it)
            for c in index.entries.values():
                if c.job_id in in_flight:
                    continue
                if (shared or c.job_id in tried or not c.waiting) and not self._eligible(
                    c, index, now
                ):
                    continue
                if not can_take(c):
                    refused += c.waiting
                else:
                    eligible.append(c)
                    if shared and c.waiting and self._ranks.get(c.job_id, (None, 1.0))[1] == 0:
                        preferred.append(c)
                    if len(eligible) == window:
                        break
            if eligible:
                self._turn = (self._turn + i + 1) % n
                # on a shared queue, a job another worker comes first for is taken only
                # when none of ours is in the window: with a backlog, each worker drains
                # its own share and two rarely claim the same job
                return self._random.choice(preferred or eligible)
            if index.more and q not in self._rescan_due and self._widen(index, refused):
                self._rescan_due.add(q)  # the window drained: bring in the next jobs
                self.wake.set()
        return None

    def _widen(self, index: WaitingIndex, refused: int) -> bool:
        """Whether a rescan of ``index`` can bring in jobs to try. A window full of jobs
        this worker refuses would come back the same: it is widened past them (up to
        ``MAX_SCAN_WINDOW``), else no rescan (the idle ones still run)."""
        if not refused or refused < index.waiting_count:
            return True  # the window drained, or holds jobs to try later
        wider = min(MAX_SCAN_WINDOW, refused + WINDOW)  # every index opens with WINDOW
        if wider <= index.window:
            return False
        index.window = wider
        return True

    async def next(
        self, stopping: asyncio.Event, can_take: Callable[[Candidate], bool]
    ) -> Candidate | None:
        """The next job to try, waiting for one as long as needed; None once ``stopping``."""

        def fits(c: Candidate) -> bool:
            return (self._unchecked(c) or self._fits(c)) and can_take(c)

        while not stopping.is_set():
            self.wake.clear()
            await self.check_policies()
            cand = self._pick(fits)
            if cand is not None:
                if self._unchecked(cand):
                    await self._check_needs(cand)
                    if not self._fits(cand):
                        continue
                index = self.indexes[cand.queue]
                if time.monotonic() - index.workers_at > WORKERS_REFRESH_S:
                    # who else takes from this queue sets the pick's window: a view older
                    # than a few seconds (workers that started with us had not beaten yet)
                    # is read again, at most this often
                    with contextlib.suppress(LogError):
                        await index.refresh_workers()
                return cand
            if self._rescan_due:
                due, self._rescan_due = self._rescan_due, set()
                await self.rescan(due)
                continue
            stopper = asyncio.ensure_future(stopping.wait())
            waker = asyncio.ensure_future(self.wake.wait())
            done, _ = await asyncio.wait(
                [stopper, waker],
                timeout=self._next_timer(),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for w in (stopper, waker):
                w.cancel()
            if stopping.is_set():
                return None
            if not done:
                await self._idle_work()  # idle: what is due (scans, a sweep)
        return None

    def _next_timer(self) -> float:
        """Until the next scan or sweep, the next held job that may be tried again, or the
        next job another worker was preferred for."""
        now = time.monotonic()
        due = [t for _, t in self._tried.values() if t > now]
        if self._deferred > now and self._deferred != float("inf"):
            due.append(self._deferred)
        self._deferred = float("inf")
        scanned = min((i.scanned_at for i in self.indexes.values()), default=now)
        wait = max(0.05, scanned + self.scan_every_s - now)
        sweep_every = max(self.sweep_interval_s, len(self.queues) / MAX_SCANS_PER_S)
        wait = min(wait, max(0.05, self._swept_at + sweep_every / max(1, len(self.queues)) - now))
        if due:
            wait = min(wait, max(0.05, min(due) - now))
        return wait


def _rendezvous(job: str, worker: tuple[str, str]) -> int:
    """The weight of ``worker`` for ``job`` in rendezvous hashing: every worker computes the
    same order of preference for a job from the same heartbeats."""
    digest = hashlib.blake2b(f"{job}/{worker[0]}/{worker[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
