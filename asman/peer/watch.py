"""Keeping a running job's lease: the watcher that answers challenges and stops the
container when it must.

A healthy holder writes nothing to keep its lease (its heartbeat says it lives). While a job
runs, the waiting index says so (``r``, written when the watcher starts), and its subject is
watched: a challenge (another worker's claim on top of ours) is answered
at once with ``renewed``; a cancel request, or a lease that passed to another worker, stops
the container. The subject is also read every third of the lease grace, in case a message
was missed (a reconnect). The watcher starts ``WATCH_AFTER_S`` into the job (``Watching``): a
job that ends sooner costs a timer, not a task and a subscription, and loses nothing, since
its finish is fenced (and answers a pending challenge itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from asman.errors import LeaseLost, LogError
from asman.log import subjects
from asman.log.leases import JobLease
from asman.log.policy import is_owner_bound

__all__ = ["WATCH_AFTER_S", "Running", "Watching", "watch_lease"]

logger = logging.getLogger(__name__)

#: A running job's watcher subscribes to the job's subject only after this long: a job that
#: ends sooner costs no subscription, and loses nothing, since its finish is fenced (a
#: cancel or a foreign claim on top makes the finishing compare-and-set fail and is read).
WATCH_AFTER_S = 0.25


@dataclass(slots=True)
class Running:
    """A job the worker runs now: its lease, and why it is being stopped."""

    lease: JobLease
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    why: str = ""  # "cancelled", "lost" or "handback" once stop is set
    gpus: tuple[str, ...] = ()
    exited: bool = False  # the container is gone; outputs and result are being written
    holds_slot: bool = True  # False once the slot went to the next job (``Worker._exited``)


async def _wake_on_job(lease: JobLease, wake: asyncio.Event) -> Callable[[], Awaitable[None]]:
    """Set ``wake`` on others' events on the job, and on a change of its queue's policy (a
    revocation hands the job on at once)."""
    stop_job = await lease.log.wake_on(lease.subject, wake, ignore=lease.is_own)
    if not is_owner_bound(lease.queue):
        return stop_job
    try:
        stop_policy = await lease.log.wake_on(subjects.policy_subject(lease.queue), wake)
    except BaseException:
        await stop_job()
        raise

    async def stop() -> None:
        await stop_job()
        await stop_policy()

    return stop


async def watch_lease(running: Running) -> None:
    """Answer a challenge, and stop the container at once when a cancel lands or the lease
    passed to another worker (started ``WATCH_AFTER_S`` into the job by ``Watching``: what
    landed before is read when the watch starts)."""
    lease = running.lease
    wake = asyncio.Event()
    stop_sub: Callable[[], Awaitable[None]] | None = None
    ttl = lease.history.rules.lease_ms / 1000  # the queue's own, when its policy says
    # the waiting index says the job runs (a job that ends sooner never needs saying so:
    # its index entry goes from waiting to done)
    await lease.announce()
    try:
        while not running.stop.is_set():
            if stop_sub is None:
                # subscribed first, then read: nothing appended in between is missed;
                # while the subscription fails (a reconnect), the lease is still kept
                try:
                    stop_sub = await _wake_on_job(lease, wake)
                except LogError as exc:
                    logger.warning("job=%s cannot watch the job yet: %s", lease.job_id, exc)
            else:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(ttl / 3):
                        await wake.wait()
            wake.clear()
            try:
                state = await lease.check()
            except LeaseLost:
                running.why = "lost"
                running.stop.set()
                return
            except LogError as exc:
                logger.warning("job=%s lease check failed: %s", lease.job_id, exc)
                continue
            if state.cancel_requested:
                running.why = running.why or "cancelled"
                running.stop.set()
                return
            if stop_sub is None:
                await asyncio.sleep(1.0)
    finally:
        if stop_sub is not None:
            await stop_sub()


class Watching:
    """A running job's watcher, started ``WATCH_AFTER_S`` after the job: a job that ends
    sooner costs a timer, not a task and a subscription."""

    def __init__(self, running: Running) -> None:
        self._running = running
        self._task: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._start)

    def _start(self) -> None:
        if not self._running.stop.is_set():
            job = self._running.lease.job_id
            self._task = asyncio.create_task(watch_lease(self._running), name=f"watch-{job[:8]}")
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """A watcher that fails keeps no lease alive: stop the job and hand it back now,
        rather than let the lease run out under a running container."""
        if task.cancelled() or task.exception() is None:
            return
        running = self._running
        logger.error("job=%s watcher failed: %r", running.lease.job_id, task.exception())
        running.why = running.why or "handback"
        running.stop.set()

    async def stop(self) -> None:
        self._timer.cancel()
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])  # our own cancellation still propagates
