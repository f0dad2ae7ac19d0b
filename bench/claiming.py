"""The claim path without a ``Worker`` around it (benchmark-only): a queue's waiting index,
followed live, and its waiting jobs claimed oldest first, as a worker's dispatcher would
(without its fairness between queues, GPU rules or challenges)."""

from __future__ import annotations

import asyncio
import random
import time

from asman.log.connection import Log
from asman.log.leases import JobLease, WaitingIndex, claim


class Claimer:
    def __init__(self, log: Log, queue: str) -> None:
        self.log = log
        self.queue = queue
        self.wake = asyncio.Event()
        self.index = WaitingIndex(log, queue, self.wake)
        self._taken: set[str] = set()
        self._random = random.Random()
        self._scanning = asyncio.Lock()  # the loops share one scan at a time

    async def open(self) -> Claimer:
        await self.index.open()
        await self.index.scan()
        return self

    async def close(self) -> None:
        await self.index.close()

    async def _scan(self) -> None:
        if self._scanning.locked():
            async with self._scanning:  # another loop scans: use its result
                return
        async with self._scanning:
            await self.index.scan()

    async def next(self, timeout: float) -> JobLease | None:
        """Claim the next waiting job; None when nothing waits for ``timeout`` seconds (a
        fresh scan says so)."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = []  # the oldest first (the index keeps its entries in order)
            for c in self.index.entries.values():
                if c.waiting and c.job_id not in self._taken:
                    waiting.append(c)
                    if len(waiting) == 8:
                        break
            if waiting:
                cand = self._random.choice(waiting[:8])
                self._taken.add(cand.job_id)
                lease = await claim(self.log, self.queue, cand.job_id, cand.entry.seq)
                if lease is not None:
                    return lease
                continue
            if self.index.more:  # the window drained: bring in the next jobs at once
                await self._scan()
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                await self._scan()
                if not any(
                    c.waiting and c.job_id not in self._taken for c in self.index.entries.values()
                ):
                    return None
                deadline = time.monotonic() + timeout
                continue
            self.wake.clear()
            try:
                async with asyncio.timeout(left):
                    await self.wake.wait()
            except TimeoutError:
                pass
