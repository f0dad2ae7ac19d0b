"""Finding work for a worker's free slots, across its queues, without a consumer per queue.

The dispatcher keeps one ``WaitingIndex`` per queue (a scan, then live updates on a core
subscription) and hands the worker one candidate at a time:

* **Fair between queues**: queues take turns (round robin over those with something to do).
* **Roughly first come, first served in a queue**: the oldest entries go first; a worker picks
  at random among the few oldest, so that workers woken by the same entry rarely collide on
  the same job (a collision costs one refused compare-and-set).
* **No job starved**: a job whose claim found nothing to do is skipped only until its entry
  changes (or for a short while); a rescan every ``scan_interval_s`` while idle finds what a
  lost live message missed, and what a gone worker still holds (its heartbeat expired), which
  the claim path then challenges; a sweep every ``sweep_interval_s`` rewrites the index entry
  of any unfinished job that lacks one (a submitter that died before writing it, or junk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

from asman.errors import LogError
from asman.log import jobs, wire
from asman.log.connection import Log
from asman.log.leases import Candidate, WaitingIndex

__all__ = ["Dispatcher"]

logger = logging.getLogger(__name__)

#: a worker picks at random among this many of a queue's oldest waiting jobs
PICK_WINDOW = 8
#: a job whose claim found nothing to do is left alone this long if its entry stays the same
TRIED_HOLD_S = 30.0


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
        self._random = random.Random()
        self._rescan_due = False

    async def open(self) -> Dispatcher:
        for q in self.queues:
            self.indexes[q] = await WaitingIndex(self.log, q, self.wake).open()
        await self.rescan()
        return self

    async def close(self) -> None:
        for index in self.indexes.values():
            await index.close()

    async def rescan(self) -> None:
        for q, index in self.indexes.items():
            try:
                await index.scan()
            except LogError as exc:
                logger.warning("scan of queue %s failed: %s", q, exc)

    async def sweep(self) -> None:
        """Repair the index: every unfinished job of our queues gets an entry if it has none
        (the claim path then decides what it needs). Reads every job of the queue, so it is
        rare."""
        self._swept_at = time.monotonic()
        for q, index in self.indexes.items():
            try:
                for state in await jobs.list_jobs(self.log, q):
                    if state.finished or state.job_id in index.entries:
                        continue
                    await jobs.mark_waiting(
                        self.log, q, state.job_class, state.job_id, state.last_seq
                    )
                    logger.info("job=%s queue=%s index entry repaired", state.job_id, q)
            except LogError as exc:
                logger.warning("sweep of %s failed: %s", q, exc)

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
        # running: a candidate only when its holder has no live heartbeat (gone)
        if (cand.entry.holder, cand.entry.proc) == (self.log.peer_id, self.log.session):
            return False
        holder = index.workers.get((cand.entry.holder, cand.entry.proc))
        return holder is None and index.scanned_at > 0

    def _pick(self, can_take: Callable[[Candidate], bool]) -> Candidate | None:
        now = time.monotonic()
        n = len(self.queues)
        for i in range(n):
            q = self.queues[(self._turn + i) % n]
            index = self.indexes[q]
            eligible = sorted(
                (
                    c
                    for c in index.entries.values()
                    if self._eligible(c, index, now) and can_take(c)
                ),
                key=lambda c: c.order,
            )
            if eligible:
                self._turn = (self._turn + i + 1) % n
                return self._random.choice(eligible[:PICK_WINDOW])
            if index.more and not self._rescan_due:
                self._rescan_due = True  # the window drained: bring in the next jobs
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
                self._rescan_due = False
                await self.rescan()
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
            if not done:  # idle: past the scan interval, look again
                now = time.monotonic()
                if now - self._swept_at >= self.sweep_interval_s:
                    with contextlib.suppress(LogError):
                        await self.sweep()
                scanned = min((i.scanned_at for i in self.indexes.values()), default=0.0)
                if now - scanned >= self.scan_interval_s:
                    await self.rescan()
        return None

    def _next_timer(self) -> float:
        """Until the next rescan, or the next held job that may be tried again."""
        now = time.monotonic()
        due = [t for _, t in self._tried.values() if t > now]
        scanned = min((i.scanned_at for i in self.indexes.values()), default=now)
        wait = max(0.05, scanned + self.scan_interval_s - now)
        if due:
            wait = min(wait, max(0.05, min(due) - now))
        return wait
