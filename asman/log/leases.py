"""Tickets and leases: how a worker takes a job, keeps it, and finishes it (DESIGN §2).

State machine of one attempt, as seen by the worker that holds it::

    fetch ticket ──► read job ──► finished? ──────────────► term ticket
                        │         attempts exhausted? ────► finished(worker_lost), term
                        ▼
                    claimed (CAS on the job's last sequence; lost race → read again)
                        │   in_progress() on the ticket every lease/3 keeps the lease
                        ▼
                    started (CAS on own claim)
                        │
                        ▼
                    finished (CAS on own last event) ──► ack ticket
                        │ CAS lost: read again
                        ├─ cancel request on top of own claim → finish as cancelled (CAS) → ack
                        └─ someone else's claim on top → LeaseLost: result discarded, ticket
                           never touched again (an old delivery's ack would remove the new one)

The ticket's ack wait *is* the lease: a worker that stops calling ``in_progress`` loses the
ticket to redelivery, and the next worker claims on top of the stale claim.

Cost. A ticket names the job's last sequence when it was written (``wire.ticket_payload``),
so on a first delivery the worker sends its CAS claim on that sequence and the read of the
history together (one round trip); the claim counts only once the fold of the verified
history accepts it, exactly as on the read-first path, which any other case takes. The lease
keeps the verified history (``JobHistory``): each event is read and verified once, our own
accepted appends are recorded first-hand, so started and finished need no read back and a
watcher's ``check`` reads only what others appended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from asman.errors import Conflict, LeaseLost, LogError
from asman.log import subjects, wire
from asman.log.connection import Log, translate_errors
from asman.log.events import CheckedEvent, JobState, now_ms
from asman.log.jobs import CAS_RETRIES, JobHistory

__all__ = ["JobLease", "Ticket", "TicketSource", "claim"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Ticket:
    """One delivery of a job's dispatch ticket."""

    queue: str
    job_class: str
    job_id: str
    delivered: int
    stream_seq: int
    _msg: Msg
    hint_seq: int = 0  # the job's last sequence as the ticket's writer saw it (0: unknown)

    async def in_progress(self) -> None:
        with translate_errors(f"extending the lease on {self.job_id}"):
            await self._msg.in_progress()

    async def ack(self) -> None:
        """Remove the ticket. Not waited for: it is sent only once the job's ``finished``
        is on the log, so a lost ack costs one redelivery, which finds the job finished and
        terms the ticket."""
        with translate_errors(f"acking ticket of {self.job_id}"):
            await self._msg.ack()

    async def nak(self, delay: float | None = None) -> None:
        with translate_errors(f"handing back ticket of {self.job_id}"):
            await self._msg.nak(delay=delay)

    async def term(self) -> None:
        with translate_errors(f"terminating ticket of {self.job_id}"):
            await self._msg.term()


class TicketSource:
    """A worker's pull subscription on one (queue, class): the durable consumer shared by
    every worker of that queue, created on first use."""

    def __init__(self, log: Log, queue: str, job_class: str) -> None:
        self.log = log
        self.queue = subjects.validate_queue(queue)
        self.job_class = job_class
        self.durable = subjects.consumer_name(queue, job_class)
        self._sub: JetStreamContext.PullSubscription | None = None

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=subjects.pending_filter(self.queue, self.job_class),
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=float(self.log.config.lease_ttl_s),
            max_deliver=-1,
            max_ack_pending=-1,
            max_waiting=512,
        )

    async def open(self) -> TicketSource:
        js = self.log.js
        with translate_errors(f"opening consumer {self.durable}"):
            await js.add_consumer(subjects.PENDING_STREAM, self.consumer_config())
            self._sub = await js.pull_subscribe_bind(
                durable=self.durable, stream=subjects.PENDING_STREAM
            )
        return self

    async def close(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except (nats.errors.Error, LogError) as exc:
                logger.debug("unsubscribe %s: %s", self.durable, exc)

    async def fetch(self, batch: int, timeout: float) -> list[Ticket]:
        """Up to ``batch`` tickets (never more), waiting at most ``timeout`` seconds."""
        if self._sub is None:
            raise LogError("ticket source is not open")
        try:
            with translate_errors(f"fetching from {self.durable}"):
                msgs = await self._sub.fetch(batch=batch, timeout=timeout)
        except LogError as exc:
            if isinstance(exc.__cause__, nats.errors.TimeoutError):
                return []
            raise
        out = []
        for msg in msgs:
            parts = msg.subject.split(".")
            md = msg.metadata
            out.append(
                Ticket(
                    queue=parts[2],
                    job_class=parts[3],
                    job_id=parts[4],
                    delivered=md.num_delivered,
                    stream_seq=md.sequence.stream,
                    _msg=msg,
                    hint_seq=wire.ticket_hint(msg.data),
                )
            )
        return out

    async def pending(self) -> tuple[int, int]:
        """(tickets waiting, tickets delivered and not yet acked) for this consumer."""
        with translate_errors(f"reading consumer {self.durable}"):
            info = await self.log.js.consumer_info(subjects.PENDING_STREAM, self.durable)
        return int(info.num_pending or 0), int(info.num_ack_pending or 0)


class JobLease:
    """A worker's live claim on one attempt of one job.

    The lease keeps the job's verified history (``JobHistory``): each event is read and
    verified once, and our own fenced appends are recorded first-hand, so ``check`` reads
    only what others appended since and ``start``/``finish`` need no read back.
    """

    def __init__(
        self,
        log: Log,
        ticket: Ticket,
        state: JobState,
        claim_seq: int,
        history: JobHistory,
        sent: set[bytes] | None = None,
    ) -> None:
        self.log = log
        self.ticket = ticket
        self.queue = ticket.queue
        self.job_id = ticket.job_id
        self.state = state
        self.attempt = state.claims
        self.last_seq = claim_seq
        self.history = history
        self.subject = history.subject
        self.done = False
        self._sent = sent if sent is not None else set()  # envelopes of our own events

    def _ours(self, state: JobState | None) -> JobState:
        if (
            state is None
            or state.lease is None
            or state.lease.worker != self.log.peer_id
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
        return data in self._sent

    async def keepalive(self) -> None:
        """Push the ticket's ack deadline back (the lease ttl)."""
        await self.ticket.in_progress()

    async def check(self) -> JobState:
        """Read what was appended to the job since; raises LeaseLost when another claim is on
        top of ours."""
        self.state = self._ours(await self.history.read())
        return self.state

    async def _append(self, event: dict[str, Any]) -> JobState:
        """One fenced append on our last known sequence; Conflict if someone wrote first."""
        expected = self.last_seq
        own = await self.log.append_checked(
            self.subject, event, expected_last_seq=expected, sent=self._sent
        )
        state = await self.history.appended(own, expected)
        assert state is not None  # our own claim is in the history
        self.last_seq = own.seq
        self.state = state
        return state

    async def _append_fenced(self, event: dict[str, Any]) -> JobState:
        for _ in range(CAS_RETRIES):
            try:
                return await self._append(event)
            except Conflict:
                state = await self.check()
                self.last_seq = state.last_seq
        raise LeaseLost(self.queue, self.job_id, "job subject keeps changing; giving up")

    async def start(self) -> None:
        """Record that the container started."""
        await self._append_fenced({"type": "started", "ts": now_ms(), "attempt": self.attempt})

    async def finish(self, result: dict[str, Any]) -> JobState:
        """Publish ``finished`` fenced on our own claim, then ack the ticket.

        ``result`` holds reason, exit_code, oom_killed, duration_ms, message, outputs, log.
        When a cancel request landed on our claim, the job is finished as cancelled.
        Returns the job's state with our ``finished`` folded in.
        """
        event: dict[str, Any] = {
            **result,
            "type": "finished",
            "ts": now_ms(),
            "attempt": self.attempt,
        }
        for _ in range(CAS_RETRIES):
            try:
                final = await self._append(event)
            except Conflict:
                state = await self.check()  # raises LeaseLost on a foreign claim
                self.last_seq = state.last_seq
                if state.cancel_requested and event.get("reason") != "cancelled":
                    event = {**event, "reason": "cancelled", "message": "cancelled"}
                continue
            # our finished is on the log, accepted by CAS on our own last event: now ack
            await self.ticket.ack()
            self.done = True
            return final
        raise LeaseLost(self.queue, self.job_id, "job subject keeps changing; giving up")

    async def release(self) -> None:
        """Hand the job back untried (draining): ``released`` then nak, so another worker
        takes it at once and the attempt is not counted."""
        await self._append_fenced({"type": "released", "ts": now_ms(), "attempt": self.attempt})
        await self.ticket.nak()
        self.done = True


def _claim_event(log: Log, ticket: Ticket) -> dict[str, Any]:
    return {
        "type": "claimed",
        "ts": now_ms(),
        "lease_ms": int(log.config.lease_ttl_s * 1000),
        "delivered": ticket.delivered,
        "ticket_seq": ticket.stream_seq,
    }


async def _finish_worker_lost(log: Log, ticket: Ticket, state: JobState) -> None:
    """Attempts exhausted: finish the job as ``worker_lost`` (CAS on its last event)."""
    await log.append(
        subjects.job_subject(ticket.queue, ticket.job_id),
        {
            "type": "finished",
            "ts": now_ms(),
            "reason": "worker_lost",
            "attempt": state.claims,
            "message": f"no worker finished the job in {state.claims} attempts",
        },
        expected_last_seq=state.last_seq,
    )
    logger.info(
        "job=%s queue=%s worker_lost attempts=%d", ticket.job_id, ticket.queue, state.claims
    )
    await ticket.term()


async def _claim_on_hint(
    log: Log, ticket: Ticket, history: JobHistory, sent: set[bytes]
) -> JobLease | None:
    """First delivery of a ticket that names the job's last sequence: claim by CAS on that
    sequence while the history is read and verified, in one round trip instead of two.

    The claim is believed only when the fold of the verified history accepts it, as in the
    read-first path; None sends the caller down that path (the CAS lost, or the claim is
    noise on a job that does not admit it: a stale or forged hint)."""
    hint = ticket.hint_seq
    appending = asyncio.ensure_future(
        log.append_checked(
            history.subject, _claim_event(log, ticket), expected_last_seq=hint, sent=sent
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
        return None
    if state.claims > log.config.max_attempts:  # only a forged ticket gets here
        with contextlib.suppress(Conflict):
            await _finish_worker_lost(log, ticket, state)
        return None
    logger.info("job=%s queue=%s claimed attempt=%d", ticket.job_id, ticket.queue, state.claims)
    return JobLease(log, ticket, state, own.seq, history, sent)


async def claim(log: Log, ticket: Ticket) -> JobLease | None:
    """Claim the job behind ``ticket``; None when there is nothing to run (ticket termed)."""
    queue, job = ticket.queue, ticket.job_id
    history = JobHistory(log, queue, job)
    subject = history.subject
    sent: set[bytes] = set()  # our claims, for JobLease.is_own
    if ticket.hint_seq > 0 and ticket.delivered == 1:
        lease = await _claim_on_hint(log, ticket, history, sent)
        if lease is not None:
            return lease
    for _ in range(CAS_RETRIES):
        state = await history.read()
        if state is None or state.finished:
            await ticket.term()
            return None
        if state.lease is not None and state.lease.delivery >= (
            ticket.stream_seq,
            ticket.delivered,
        ):
            # another worker claimed with this very delivery (or a later one): we lost the
            # race, and the ticket is theirs now; leave it alone
            logger.debug("job=%s lost the claim race to %s", job, state.lease.worker[:12])
            return None
        if state.lease is not None and state.claims >= log.config.max_attempts:
            try:
                await _finish_worker_lost(log, ticket, state)
            except Conflict:
                continue
            return None
        try:
            own = await log.append_checked(
                subject,
                _claim_event(log, ticket),
                expected_last_seq=state.last_seq,
                sent=sent,
            )
        except Conflict:
            continue
        claimed = await history.appended(own, state.last_seq)
        if claimed is None or claimed.lease is None or claimed.lease.claim_seq != own.seq:
            continue  # our claim was not accepted by the fold (should not happen): retry
        logger.info("job=%s queue=%s claimed attempt=%d", job, queue, claimed.claims)
        return JobLease(log, ticket, claimed, own.seq, history, sent)
    raise Conflict(f"could not claim job {job}: too many concurrent writers")
