"""Finding work for a worker's free slots, across its queues, without a consumer per queue.

The dispatcher keeps one ``WaitingIndex`` per queue (a scan, then live updates on a core
subscription) and hands the worker one candidate at a time:

* **Fair between queues**: queues take turns (round robin over those with something to do).
* **Roughly first come, first served in a queue**: the oldest entries go first; a worker picks
  at random among the few oldest, so that workers woken by the same entry rarely collide on
  the same job (a collision costs one refused compare-and-set).
* **No job starved**: a job whose claim found nothing to do is skipped only until its entry
  changes (or for a short while); a rescan of each queue every ``scan_interval_s`` while idle
  (and of every queue after a reconnect) finds what a lost live message missed, and what a
  gone worker still holds (its heartbeat expired), which the claim path then challenges; a
  sweep of each queue every ``sweep_interval_s`` rewrites the index entry of any unfinished
  job that lacks one (a submitter that died before writing it, or junk).
* **Bounded for many queues**: scans and sweeps together run at most ``MAX_SCANS_PER_S`` a
  second, so a worker on 2,000 queues goes round them more slowly instead of loading the
  server; the first scan of every queue runs ``SCAN_CONCURRENCY`` at a time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable

from asman.errors import LogError
from asman.log import jobs, wire
from asman.log.connection import Log
from asman.log.events import now_ms
from asman.log.leases import Candidate, WaitingIndex

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)

#: a worker picks at random among this many of a queue's oldest waiting jobs
PICK_WINDOW = 8
#: an idle worker scans at most this many queues a second (one on 2,000 queues goes round
#: them in 100 s rather than reading 400 queues a second)
MAX_SCANS_PER_S = 20
#: queues scanned at once
SCAN_CONCURRENCY = 16
#: a job whose claim found nothing to do is left alone this long if its entry stays the same
#: (a running job's entry changes from ``w`` to ``r`` a quarter second into it; one that
#: stays ``w`` is held by a worker that never said so: looked at again, it may be gone)
TRIED_HOLD_S = 5.0


class Dispatcher:
    """One worker's view of its queues' waiting jobs."""

    def __init__(
        self,
        log: Log,
        queues: tuple[str, ...],
        *,
        scan_interval_s: float = 5.0,
        sweep_interval_s: float = 120.0,
    ) -> None:
        self.log = log
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
        self._unregister: Callable[[], None] = lambda: None

    async def open(self) -> Dispatcher:
        for q in self.queues:
            self.indexes[q] = await WaitingIndex(self.log, q, self.wake).open()
        self._unregister = self.log.on_reconnect(self._reconnected)
        await self.rescan(self.queues)
        return self

    async def close(self) -> None:
        self._unregister()
        for index in self.indexes.values():
            await index.close()

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
        (the claim path then decides what it needs). Reads every job of the queue, so each
        queue is swept once per ``sweep_interval_s`` at most."""
        index = self.indexes[queue]
        try:
            for state in await jobs.list_jobs(self.log, queue):
                if state.finished or state.job_id in index.entries:
                    continue
                await jobs.mark_waiting(
                    self.log, queue, state.job_class, state.job_id, state.last_seq
                )
                logger.info("job=%s queue=%s index entry repaired", state.job_id, queue)
        except LogError as exc:
            logger.warning("sweep of %s failed: %s", queue, exc)

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
        index = self.indexes.get(cand.queue)
        if index is not None:
            index.forget(cand.job_id)

    def _eligible(self, cand: Candidate, index: WaitingIndex, now: float) -> bool:
        if cand.job_id in self._in_flight:
            return False
        tried = self._tried.get(cand.job_id)
        if tried is not None:
            if tried[0] == cand.entry and tried[1] > now:
                return False
            del self._tried[cand.job_id]
        if cand.waiting:
            return True
        # running: a candidate only when its holder has no live heartbeat (gone), and the
        # entry is older than a heartbeat's life (a worker that just claimed may not have
        # beaten yet); the claim path looks again before it challenges anyone
        if (cand.entry.holder, cand.entry.proc) == (self.log.peer_id, self.log.session):
            return False
        if (cand.entry.holder, cand.entry.proc) in index.workers or cand.ts is None:
            return False
        return now_ms() > cand.ts + self.log.heartbeat_ttl_ms

    def _pick(self, can_take: Callable[[Candidate], bool]) -> Candidate | None:
        now = time.monotonic()
        n = len(self.queues)
        in_flight, tried = self._in_flight, self._tried
        for i in range(n):
            q = self.queues[(self._turn + i) % n]
            index = self.indexes[q]
            # entries are kept oldest first (a changed entry moves to the end), so the first
            # eligible ones are the oldest: no sort
            eligible: list[Candidate] = []
            for c in index.entries.values():
                if c.job_id in in_flight:
                    continue
                if (c.job_id in tried or not c.waiting) and not self._eligible(c, index, now):
                    continue
                if can_take(c):
                    eligible.append(c)
                    if len(eligible) == PICK_WINDOW:
                        break
            if eligible:
                self._turn = (self._turn + i + 1) % n
                return self._random.choice(eligible)
            if index.more and q not in self._rescan_due:
                self._rescan_due.add(q)  # the window drained: bring in the next jobs
                self.wake.set()
        return None

    async def next(
        self, stopping: asyncio.Event, can_take: Callable[[Candidate], bool]
    ) -> Candidate | None:
        """The next job to try, waiting for one as long as needed; None once ``stopping``."""
        while not stopping.is_set():
            self.wake.clear()
            cand = self._pick(can_take)
            if cand is not None:
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
        """Until the next scan or sweep, or the next held job that may be tried again."""
        now = time.monotonic()
        due = [t for _, t in self._tried.values() if t > now]
        scanned = min((i.scanned_at for i in self.indexes.values()), default=now)
        wait = max(0.05, scanned + self.scan_every_s - now)
        sweep_every = max(self.sweep_interval_s, len(self.queues) / MAX_SCANS_PER_S)
        wait = min(wait, max(0.05, self._swept_at + sweep_every / max(1, len(self.queues)) - now))
        if due:
            wait = min(wait, max(0.05, min(due) - now))
        return wait
