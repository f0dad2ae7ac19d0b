"""Job operations on the log: submit, read, list, watch, cancel, requeue.

Submit is idempotent: the ``submitted`` event is a compare-and-set on an empty subject, and
the job's waiting-index entry is written again each time it is found queued, so submitting
again is always safe and repairs a job whose entry was never written (or was overwritten).

Submit and cancel also append events signed by a key this peer does not hold (a browser's,
through the gateway): ``prepare_submit`` / ``prepare_cancel`` build the event and the bytes
that key signs, and ``submit`` / ``cancel`` with ``signed=`` append the verified envelope as it
is, by the same compare-and-set, once they have checked it is the very event they would write.
Its ``prev`` is signed, so it can go nowhere else: when the job moved on, ``Conflict`` says to
prepare and sign again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from asman.errors import (
    AsmanError,
    Conflict,
    HistoryFull,
    InvalidInput,
    JobNotFound,
    LogError,
    UnauthorizedSigner,
)
from asman.log import subjects, wire
from asman.log.connection import DONE_TTL, Log
from asman.log.control import control_text, validate_control, with_namespace
from asman.log.definition import JobSpec, image_class, job_id, validate_definition
from asman.log.events import (
    ALL_NAMESPACES,
    DEFAULT_NAMESPACE,
    CheckedEvent,
    Hold,
    JobFold,
    JobState,
    RawEvent,
    Rules,
    check_event,
    fold,
    now_ms,
    past_retention,
    validate_namespace,
)
from asman.log.keys import peer_id_to_bytes

__all__ = [
    "SIGNED_TS_WINDOW_MS",
    "JobHistory",
    "Prepared",
    "SignedEvent",
    "Submitted",
    "cancel",
    "cancel_event",
    "hold",
    "list_jobs",
    "mark_done",
    "mark_waiting",
    "prepare_cancel",
    "prepare_submit",
    "read_job",
    "requeue",
    "submit",
    "submitted_event",
    "wait_finished",
    "watch_job",
    "watch_queue",
]

logger = logging.getLogger(__name__)

CAS_RETRIES = 16
WATCH_POLL_S = 5.0
#: How far the ``ts`` of an event signed elsewhere may be from this peer's clock (the peer
#: that prepared it wrote it, moments before it was signed).
SIGNED_TS_WINDOW_MS = 10 * 60 * 1000


@dataclass(frozen=True, slots=True)
class Submitted:
    """What ``submit`` did: ``created`` a new job, found it ``cached`` (finished with a
    result), ``requeued`` a finished one, or found it already queued or running.

    ``namespace`` is the one the submission holds the job for; ``hold`` is this peer's hold
    of the job for it (None for a cached result, or a job that is being cancelled), and
    ``replacing`` the jobs it replaces there (``asman.log.namespaces``)."""

    queue: str
    job_id: str
    state: JobState
    created: bool
    cached: bool
    requeued: bool
    namespace: str = DEFAULT_NAMESPACE
    hold: Hold | None = None
    #: this submission wrote ``hold`` (it did not find it there)
    held_now: bool = False
    replacing: tuple[Any, ...] = ()


def definition_text(definition: Mapping[str, Any]) -> str:
    """The definition as stored on the log: compact JSON, keys in the submitter's order."""
    return json.dumps(definition, separators=(",", ":"), ensure_ascii=False)


def submitted_event(
    clean: Mapping[str, Any],
    via: str = "",
    namespace: str = DEFAULT_NAMESPACE,
    control: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``submitted`` event of a validated definition (without ``prev``), held for
    ``namespace``, with its checked ``control`` (``asman.log.control``) when it has one."""
    event = {
        "type": "submitted",
        "ts": now_ms(),
        "definition": definition_text(clean),
        "class": image_class(clean),
        "via": via,
    }
    if namespace != DEFAULT_NAMESPACE:
        event["namespace"] = namespace
    if control:
        event["control"] = control_text(control)
    return event


def cancel_event(message: str) -> dict[str, Any]:
    """A ``cancel`` event (without ``prev``)."""
    return {"type": "cancel", "ts": now_ms(), "message": message}


@dataclass(frozen=True, slots=True)
class SignedEvent:
    """An event signed by a key this peer does not hold (a browser's, through the gateway),
    verified as every reader verifies it. ``submit`` and ``cancel`` append it as it is."""

    envelope: bytes
    opened: wire.Opened

    @classmethod
    def verify(
        cls, protected: bytes, payload: bytes, signature: bytes, subject: str
    ) -> SignedEvent:
        """The envelope of these parts (``wire.to_sign`` made the first two), verified on
        ``subject`` as any reader verifies it: an ``EnvelopeError`` when it does not."""
        envelope = wire.assemble(protected, payload, signature)
        return cls(envelope, wire.open_envelope(envelope, subject))

    @property
    def signer(self) -> str:
        return self.opened.signer

    @property
    def kind(self) -> str:
        kind = self.opened.event.get("type")
        return kind if isinstance(kind, str) else ""

    @property
    def prev(self) -> int:
        prev = self.opened.event.get("prev")
        return prev if type(prev) is int else -1

    def check(self, subject: str, expected: Mapping[str, Any]) -> None:
        """``InvalidInput`` unless this is ``expected`` (the event this peer would write) for
        ``subject``, with a ``ts`` of its own near this peer's clock and a ``prev``."""
        event = self.opened.event
        if self.opened.protected_sub != subject:
            raise InvalidInput(
                f"the signed event is for {self.opened.protected_sub!r}, not for {subject!r}"
            )
        if event.get("v") != wire.SCHEMA_VERSION:
            raise InvalidInput(
                f"the signed event's 'v' is {event.get('v')!r}: events are wire "
                f"v{wire.SCHEMA_VERSION}; prepare it again"
            )
        if self.prev < 0:
            raise InvalidInput(
                "the signed event's 'prev' must be the sequence of the job's last message "
                f"(a whole number), got {event.get('prev')!r}; prepare it again"
            )
        ts, now = event.get("ts"), now_ms()
        if type(ts) is not int or abs(ts - now) > SIGNED_TS_WINDOW_MS:
            raise InvalidInput(
                f"the signed event's 'ts' ({str(ts)[:20]}) is not within "
                f"{SIGNED_TS_WINDOW_MS // 60_000} minutes of now: prepare and sign it again"
            )
        fixed = {"v", "prev", "ts"}
        unknown = sorted(k for k in event if k not in expected and k not in fixed)
        differ = sorted(k for k in expected if k not in fixed and event.get(k) != expected[k])
        if unknown or differ:
            what = []
            if differ:
                what.append(f"its {', '.join(differ)} differ from what this peer writes")
            if unknown:
                what.append(f"it has fields this peer does not write: {', '.join(unknown)}")
            raise InvalidInput(
                f"the signed event is not the {expected.get('type')} this peer would append: "
                f"{'; '.join(what)}"[:500]
            )


@dataclass(frozen=True, slots=True)
class Prepared:
    """An event for a key this peer does not hold to sign: ``event`` is what readers will
    see (with ``v`` and ``prev``), ``unsigned.data`` the exact bytes to sign."""

    queue: str
    job_id: str
    subject: str
    signer: str
    event: dict[str, Any]
    unsigned: wire.ToSign


def _prepared(queue: str, job: str, signer: str, event: dict[str, Any]) -> Prepared:
    subject = subjects.job_subject(queue, job)
    unsigned = wire.to_sign(peer_id_to_bytes(signer), subject, event)
    return Prepared(queue, job, subject, signer, {"v": wire.SCHEMA_VERSION, **event}, unsigned)


def _stale(job: str, last_seq: int, signed: SignedEvent) -> Conflict:
    return Conflict(
        f"job {job} moved on since its event was prepared (it follows message {signed.prev}, "
        f"the job's last is now {last_seq}): prepare and sign it again"
    )


def _not_yours(job: str, submitter: str, signer: str) -> UnauthorizedSigner:
    return UnauthorizedSigner(
        f"job {job[:12]}… belongs to another key: only the key that submitted it "
        f"({submitter[:12]}…) may cancel it, and this one is {signer[:12]}…"
    )


async def _append(
    log: Log,
    subject: str,
    event: dict[str, Any],
    expected_last_seq: int,
    signed: SignedEvent | None,
) -> CheckedEvent:
    """Our ``event``, signed by this peer, or the ``signed`` one as it is (its ``prev`` is
    ``expected_last_seq``: the callers check)."""
    if signed is None:
        return await log.append_checked(subject, event, expected_last_seq=expected_last_seq)
    return await log.append_signed(
        subject, signed.envelope, signed.opened, expected_last_seq=expected_last_seq
    )


class JobHistory:
    """One job's events, each read and verified once: a peer that follows a job (a lease, a
    watcher) re-reads only what was appended since, and folds each new event once.

    Sequences only grow, so a read from the last known sequence on is complete; our own
    appends are recorded first-hand (``appended``) when the compare-and-set proves that
    nothing came between the last event we know and ours. A first-hand event has no server
    time yet: the fold is marked before it, and the next read that brings anything (or an
    append whose outcome depends on server time) reads our events back with their times and
    folds them again from the mark.
    """

    __slots__ = (
        "_fold",
        "_unknown_from",
        "job_id",
        "last_seq",
        "log",
        "mine",
        "queue",
        "subject",
    )

    def __init__(self, log: Log, queue: str, job: str) -> None:
        self.log = log
        self.queue = queue
        self.job_id = job
        self.subject = subjects.job_subject(queue, job)
        self.last_seq = 0  # stream sequence of the last message known (0 if none)
        self._fold = JobFold(queue, job, self.subject, log.rules)
        self._unknown_from = 0  # first sequence known only first-hand (0: none)
        #: our own envelopes on this subject (``Log.append_checked(sent=...)``): read back,
        #: they need no verification
        self.mine: dict[bytes, wire.Opened] = {}

    def state(self) -> JobState | None:
        """The fold of the events known so far."""
        return self._fold.state()

    @property
    def rules(self) -> Rules:
        """The protocol's numbers this job is folded with: the deployment's, with the lease
        TTL of its queue's policy when it sets one."""
        return self._fold.rules

    def _add(self, event: CheckedEvent) -> None:
        if event.seq > self.last_seq:  # a concurrent read may have brought it already
            self._fold.add(event)
            self.last_seq = event.seq

    async def _policy(self) -> None:
        """Fold under the queue's latest policy: when it changed since the fold began, the
        history is folded again from the start (rare: an owner changed the policy)."""
        view = await self.log.policies.get(self.queue)
        known = self._fold.policy
        if (view.version if view else 0) == (known.version if known else 0):
            return
        self._fold = JobFold(self.queue, self.job_id, self.subject, self.log.rules, view)
        self.last_seq = 0
        self._unknown_from = 0

    async def read(self) -> JobState | None:
        """Read and verify what was appended since the last read; the job's state now."""
        await self._policy()
        start = self._unknown_from or self.last_seq + 1
        if self._fold.full and not self._unknown_from:
            return self.state()  # the history reached its limit: nothing more is read
        new = await self.log.read_subject(
            subjects.JOBS_STREAM,
            self.subject,
            start,
            max_bytes=self.log.rules.max_history_bytes,
        )
        if self._unknown_from:
            if not new:
                return self.state()
            self._fold.rewind()
            self.last_seq = self._fold.last_seq
            self._unknown_from = 0
        for raw in new:
            if raw.seq > self.last_seq:
                opened = self.mine.get(raw.data)
                if opened is not None:  # our own event, read back with its server time
                    self._add(CheckedEvent(raw.seq, opened, "", raw.ts, len(raw.data)))
                else:
                    self._add(check_event(raw, self.subject))
        self._fold.log_rejections()
        return self.state()

    async def appended(self, own: CheckedEvent, expected_last_seq: int) -> JobState | None:
        """Record our own event, accepted by a compare-and-set on ``expected_last_seq``.

        When the last message we know is that sequence, ours is the very next one on the
        subject and needs no read, unless its outcome depends on server time (answering a
        challenge, taking a lease over, forcing a cancel): then it is read back."""
        if own.seq <= self.last_seq:
            return self.state()
        if self.last_seq == expected_last_seq and not self._fold.needs_server_time(own):
            if not self._unknown_from:
                self._fold.mark()
                self._unknown_from = own.seq
            self._add(own)
            return self.state()
        return await self.read()


async def read_job(log: Log, queue: str, job: str) -> JobState | None:
    """The job's state: the fold of its verified events. None if it does not exist."""
    return await JobHistory(log, queue, job).read()


async def _require(log: Log, queue: str, job: str) -> JobState:
    state = await read_job(log, queue, job)
    if state is None:
        raise JobNotFound(queue, job)
    return state


async def mark_waiting(
    log: Log,
    queue: str,
    job_class: str,
    job: str,
    last_seq: int,
    memory: int = 0,
    tagged: bool = False,
) -> None:
    """Write the job's waiting-index entry: workers see it at once (live) or on their next
    scan. Safe to repeat; ``last_seq``, the sequence of the job's last event, lets a worker
    claim without reading first; ``memory`` (``memory_asked``) lets a worker that allows less
    pass the job by without reading it, and ``tagged`` tells workers to look at its tags
    first (``entry_hints`` gives both; ``wire.waiting_entry``)."""
    await log.publish_entry(
        subjects.waiting_subject(queue, job_class, job),
        wire.waiting_entry(last_seq, memory, tagged),
    )


def tags_asked(definition: Mapping[str, Any]) -> tuple[str, ...]:
    """The tags a definition asks its worker's labels to have (none unless a list of text)."""
    tags = definition.get("tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        return ()
    return tuple(tags)


def entry_hints(definition: Mapping[str, Any]) -> dict[str, Any]:
    """``mark_waiting``'s hints for a job with this definition."""
    return {"memory": memory_asked(definition), "tagged": bool(tags_asked(definition))}


def memory_asked(definition: Mapping[str, Any]) -> int:
    """The memory a definition asks for in bytes (0: none, or not a valid definition: a
    worker claims that one, to end it with the reason)."""
    req = definition.get("requirements")
    if not isinstance(req, Mapping) or req.get("memory") is None:
        return 0
    try:
        return JobSpec.from_definition(definition).memory or 0
    except AsmanError:
        return 0


async def mark_done(log: Log, queue: str, job_class: str, job: str) -> None:
    """The job's waiting-index entry says it is finished (and goes away a second later)."""
    await log.publish_entry(
        subjects.waiting_subject(queue, job_class, job), wire.DONE_ENTRY, ttl=DONE_TTL
    )


async def submit(
    log: Log,
    queue: str,
    definition: Mapping[str, Any],
    *,
    rerun: bool = False,
    via: str = "",
    signed: SignedEvent | None = None,
    namespace: str | None = None,
    control: Mapping[str, Any] | None = None,
) -> Submitted:
    """Put a job on ``queue``. Safe to repeat; see the module docstring.

    A finished job whose reason is a result of the job (success, failed, timed_out) is served
    from cache; one that finished for another reason (error, cancelled, worker_lost) is run
    again. ``rerun=True`` runs it again whatever the reason (only its submitter may re-run a
    job that has a result).

    ``signed``: the ``submitted`` event signed by another key (``prepare_submit``), appended
    in place of this peer's own; ``InvalidInput`` when it is not this definition's, ``Conflict``
    when the job's subject moved on since it was prepared.

    The job is held for ``namespace`` (``_`` when None) by this peer: a job that exists gets
    a ``hold`` event when this peer does not hold it for that namespace yet. Replacing the
    other jobs of a namespace is ``asman.log.namespaces.submit``'s.

    ``control`` (``asman.log.control``: callbacks, namespace) is not part of the job: it goes
    with the submission that creates the job, or with a re-run, and is otherwise dropped
    (the job keeps the control it was created with). ``namespace`` and ``control.namespace``
    are one: either names it for both, and ``InvalidInput`` says when they differ.
    """
    subjects.validate_queue(queue)
    checked, named = with_namespace(control, namespace)
    ns = DEFAULT_NAMESPACE if named is None else named
    clean = validate_definition(definition)
    jid = job_id(clean)
    subject = subjects.job_subject(queue, jid)
    submitter = signed.signer if signed is not None else log.peer_id
    await _check_submit(log, queue, clean, submitter)
    event = submitted_event(clean, via, ns, checked)
    if signed is not None:
        signed.check(subject, event)
    created = False
    expected = signed.prev if signed is not None else 0
    state: JobState | None = None
    history = JobHistory(log, queue, jid)
    for _ in range(CAS_RETRIES):
        if signed is not None and expected != signed.prev:
            raise _stale(jid, expected, signed)
        try:
            own = await _append(log, subject, event, expected, signed)
        except Conflict:
            state = await history.read()
        except HistoryFull as exc:
            state = await history.read()
            if state is None:
                raise HistoryFull(
                    f"job {jid} cannot be submitted on queue {queue!r}: its subject is full "
                    "of messages that are not events of this job (junk from another key); "
                    "use another queue"
                ) from exc
        else:
            created = True
            # on an empty subject our event is the first: its state needs no read back
            state = await history.appended(own, expected)
            if state is None:  # refused: the queue's policy changed under us
                log.policies.invalidate()
                await _check_submit(log, queue, clean, submitter)
        if state is not None:
            break
        # the subject holds only invalid messages (noise, or a forged first event): append
        # on top of them
        expected = history.last_seq
    if state is None:
        raise LogError(f"could not submit job {jid}: its subject keeps changing; try again")

    requeued = False
    if state.finished and not created:
        assert state.result is not None
        view = await log.policies.get(queue)
        stale = past_retention(state, view.current if view else None, None)
        if state.result.is_result and not rerun and not stale:
            logger.info("job=%s queue=%s cached reason=%s", jid, queue, state.result.reason)
            return Submitted(
                queue, jid, state, created=False, cached=True, requeued=False, namespace=ns
            )
        state = await requeue(log, queue, jid, _state=state, namespace=ns, control=checked)
        requeued = True
    before = None if created or requeued else state.hold_of(log.peer_id, ns)
    if not created and not requeued:
        state = await hold(log, queue, jid, ns, _history=history)
    if state.state == "queued":
        await mark_waiting(
            log, queue, state.job_class, jid, state.last_seq, **entry_hints(state.definition)
        )
    logger.info("job=%s queue=%s submitted created=%s", jid, queue, created)
    return Submitted(
        queue,
        jid,
        state,
        created=created,
        cached=False,
        requeued=requeued,
        namespace=ns,
        hold=(mine := state.hold_of(log.peer_id, ns)),
        held_now=mine is not None and mine != before,
    )


async def _check_submit(log: Log, queue: str, definition: Mapping[str, Any], me: str) -> None:
    """Refuse, with what to do, a submission by the key ``me`` the queue's policy would
    ignore."""
    view = await log.policies.get(queue)
    policy = view.current if view else None
    if policy is None:
        return
    if not policy.may_submit(me):
        raise UnauthorizedSigner(
            f"queue {queue}'s policy lets only listed keys submit, and yours ({me[:12]}…) is "
            f"not one: ask its owner to run `asman queue policy set {queue} --submitter {me}`"
        )
    over = policy.ceilings.refusal(definition)
    if over:
        raise InvalidInput(f"queue {queue}'s policy refuses this job: {over}")


async def _past_retention(log: Log, state: JobState) -> bool:
    view = await log.policies.get(state.queue)
    return past_retention(state, view.current if view else None, None)


async def _is_admin(log: Log, queue: str) -> bool:
    view = await log.policies.get(queue)
    return view is not None and view.current is not None and view.current.is_admin(log.peer_id)


async def prepare_submit(
    log: Log,
    queue: str,
    definition: Mapping[str, Any],
    *,
    signer: str,
    via: str = "",
    namespace: str | None = None,
    control: Mapping[str, Any] | None = None,
) -> Prepared:
    """The ``submitted`` event of ``definition`` for the key ``signer`` (a peer id) to sign,
    then to ``submit(..., signed=...)`` with the same ``namespace`` and ``control`` (which
    the event carries, as ``submit`` writes them). It follows the subject's last message
    when that holds only junk (as ``submit`` does); a job that exists is found by the
    submit."""
    subjects.validate_queue(queue)
    checked, named = with_namespace(control, namespace)
    clean = validate_definition(definition)
    jid = job_id(clean)
    history = JobHistory(log, queue, jid)
    state = await history.read()
    prev = history.last_seq if state is None else 0
    ns = DEFAULT_NAMESPACE if named is None else named
    event = submitted_event(clean, via, ns, checked)
    return _prepared(queue, jid, signer, {**event, "prev": prev})


async def prepare_cancel(
    log: Log, queue: str, job: str, message: str = "cancelled", *, signer: str
) -> Prepared:
    """The ``cancel`` event of a job for the key ``signer`` (a peer id) to sign, then to
    ``cancel(..., signed=...)``; ``UnauthorizedSigner`` when that key did not submit it."""
    state = await _require(log, queue, job)
    if state.submitter != signer:
        raise _not_yours(job, state.submitter, signer)
    return _prepared(queue, job, signer, {**cancel_event(message), "prev": state.last_seq})


async def hold(
    log: Log,
    queue: str,
    job: str,
    namespace: str,
    *,
    again: bool = False,
    _history: JobHistory | None = None,
) -> JobState:
    """Hold the job for ``namespace`` (compute-queues §3.4): a ``hold`` event, unless this
    peer holds it for that namespace already (``again``: then too, so that its hold is the
    newest). A finished job, or one being cancelled, is left as it is."""
    validate_namespace(namespace)
    history = _history or JobHistory(log, queue, job)
    state = history.state() or await history.read()
    if state is None:
        raise JobNotFound(queue, job)
    event = {"type": "hold", "namespace": namespace}
    for _ in range(CAS_RETRIES):
        if state.finished or state.cancel_requested:
            return state
        if state.hold_of(log.peer_id, namespace) is not None and not again:
            return state
        try:
            own = await log.append_checked(
                history.subject, {**event, "ts": now_ms()}, expected_last_seq=state.last_seq
            )
        except Conflict:
            new = await history.read()
        else:
            new = await history.appended(own, state.last_seq)
            again = False
        assert new is not None
        state = new
    return state


async def requeue(
    log: Log,
    queue: str,
    job: str,
    *,
    _state: JobState | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    control: Mapping[str, Any] | None = None,
) -> JobState:
    """Run a finished job again (an explicit choice), held for ``namespace`` by this peer.
    A job not finished is left as it is. Only the submitter may re-run a job that has a
    result (``UnauthorizedSigner``). The submitter's re-run may bring a new ``control``
    (anyone else's keeps the job's)."""
    state = _state or await _require(log, queue, job)
    subject = subjects.job_subject(queue, job)
    event: dict[str, Any] = {"type": "requeued"}
    if namespace != DEFAULT_NAMESPACE:
        event["namespace"] = validate_namespace(namespace)
    if control:
        event["control"] = control_text(validate_control(control))
    for _ in range(CAS_RETRIES):
        if not state.finished:
            break
        assert state.result is not None
        if (
            state.result.is_result
            and state.submitter != log.peer_id
            and not await _is_admin(log, queue)
            and not await _past_retention(log, state)
        ):
            raise UnauthorizedSigner(
                f"job {job} has a result ({state.result.reason}), and only the peer that "
                f"submitted it ({state.submitter[:12]}…) may run it again; this peer is "
                f"{log.peer_id[:12]}…. Change the definition to run a new job",
                subject,
            )
        with contextlib.suppress(Conflict):
            await log.append(subject, {**event, "ts": now_ms()}, expected_last_seq=state.last_seq)
        state = await _require(log, queue, job)
    if state.state == "queued":
        await mark_waiting(
            log, queue, state.job_class, job, state.last_seq, **entry_hints(state.definition)
        )
    return state


async def cancel(
    log: Log,
    queue: str,
    job: str,
    message: str = "cancelled",
    *,
    force: bool = False,
    signed: SignedEvent | None = None,
    namespace: str | None = None,
    replaced_by: str | None = None,
    hold_seq: int | None = None,
) -> JobState:
    """Cancel a job. Queued: finished as cancelled at once. Running: its worker is asked to
    stop the container and finishes it as cancelled. Finished: nothing changes.

    ``namespace`` (compute-queues §3.4) removes only the holds of that name (``*``: of every
    name) that this peer may remove: its own, or any when it submitted the job; the job is
    cancelled only when no namespace holds it any more, else it goes on. A namespace that
    does not hold the job is ``InvalidInput``; one held only by other peers is
    ``UnauthorizedSigner``. ``replaced_by`` names the job that replaces this one in its
    namespace (its result then reads ``JobReplacedByClient`` in compute-queues' terms): then
    only this peer's own hold goes, and with ``hold_seq`` only while it is the hold of that
    sequence (a job held again since is left as it is). Without a namespace, only the
    submitter may cancel, and every hold goes at once.

    ``force`` on a running job whose cancel request is older than the lease grace
    (``Rules.lease_ms``, server time) finishes it as cancelled without its worker: the worker
    is gone or will not stop. Earlier, the log refuses it and the state is returned as is.

    ``signed``: the ``cancel`` event signed by another key (``prepare_cancel``), appended in
    place of this peer's own; ``InvalidInput`` when it is not this cancel,
    ``UnauthorizedSigner`` when its key did not submit the job, ``Conflict`` when the job
    moved on since it was prepared.
    """
    subject = subjects.job_subject(queue, job)
    if signed is not None:
        signed.check(subject, cancel_event(message))
    if namespace is not None:
        validate_namespace(namespace, allow_all=True)
    if replaced_by is not None:
        subjects.validate_job_id(replaced_by)
    history = JobHistory(log, queue, job)
    state = await history.read()
    if state is None:
        raise JobNotFound(queue, job)
    for _ in range(CAS_RETRIES):
        if state.finished or (state.cancel_requested and not force):
            return state
        event: dict[str, Any] = cancel_event(message)
        requested = state.cancel_requested
        if signed is not None:
            if state.submitter != signed.signer:
                raise _not_yours(job, state.submitter, signed.signer)
            if state.last_seq != signed.prev:
                raise _stale(job, state.last_seq, signed)
        elif requested:
            if log.peer_id not in (state.submitter, state.cancel_by) and not await _is_admin(
                log, queue
            ):
                raise UnauthorizedSigner(
                    f"only the peer that submitted job {job} (submitter "
                    f"{state.submitter[:12]}…), the one that asked to cancel it, or an admin "
                    f"of its queue may force its cancel; this peer is {log.peer_id[:12]}…",
                    subject,
                )
        elif namespace is not None and replaced_by is not None:
            mine = state.hold_of(log.peer_id, namespace)
            if mine is None or hold_seq not in (None, mine.seq):
                return state  # not ours, or held again since: not replaced
            event.update(namespace=namespace, replaced_by=replaced_by, hold=mine.seq)
        elif namespace is not None:
            if not await _is_admin(log, queue):
                _check_release(log, state, namespace, subject)
            event["namespace"] = namespace
        elif state.submitter != log.peer_id and not await _is_admin(log, queue):
            raise UnauthorizedSigner(
                f"only the peer that submitted job {job} (or an admin of its queue) may "
                f"cancel it (submitter {state.submitter[:12]}…, this peer "
                f"{log.peer_id[:12]}…); a peer that holds it for a namespace may cancel "
                "that namespace",
                subject,
            )
        try:
            own = await _append(log, subject, event, state.last_seq, signed)
        except Conflict:
            new = await history.read()
            assert new is not None
            state = new
            continue
        new = await history.appended(own, state.last_seq)
        assert new is not None
        state = new
        if namespace is not None and state.state == "queued":
            # other namespaces hold it: it waits on, and its entry names its new last event
            await mark_waiting(
                log, queue, state.job_class, job, state.last_seq, **entry_hints(state.definition)
            )
        if requested or namespace is not None:
            return state  # a force, or a namespace removed: the log has decided
    return state


def _check_release(log: Log, state: JobState, namespace: str, subject: str) -> None:
    """Raise unless this peer may remove some hold of ``namespace`` (``*``: any) on the job."""
    named = [h for h in state.holds if namespace in (ALL_NAMESPACES, h.namespace)]
    if not named:
        held = ", ".join(repr(n) for n in state.namespaces) or "none"
        raise InvalidInput(
            f"namespace {namespace!r} does not hold job {state.job_id} (its namespaces: "
            f"{held}): name one of them, or '*' for all"
        )
    if log.peer_id != state.submitter and all(h.key != log.peer_id for h in named):
        raise UnauthorizedSigner(
            f"namespace {named[0].namespace!r} of job {state.job_id} was added by another "
            f"peer ({named[0].key[:12]}…): only that peer, or the job's submitter "
            f"({state.submitter[:12]}…), may remove it; this peer is {log.peer_id[:12]}…",
            subject,
        )


async def list_jobs(log: Log, queue: str) -> list[JobState]:
    """Every job of ``queue`` still within retention, oldest submission first."""
    events = await log.read_subject(subjects.JOBS_STREAM, subjects.jobs_filter(queue))
    by_subject: dict[str, list[RawEvent]] = defaultdict(list)
    for ev in events:
        by_subject[ev.subject].append(ev)
    out = []
    policy = await log.policies.get(queue)
    current = policy.current if policy else None  # its retention hides older results
    for subject, evs in by_subject.items():
        try:
            q, jid = subjects.job_id_from_subject(subject)
        except AsmanError:  # the queue's policy, or junk on a subject that is no job's
            continue
        state = fold(q, jid, subject, evs, log.rules, policy)
        if state is not None and not past_retention(state, current, None):
            out.append(state)
    out.sort(key=lambda s: s.submitted_ms)
    return out


async def _notifications(log: Log, subject: str) -> AsyncIterator[None]:
    """Yields at once, then on every message on ``subject``, after a reconnect, and every few
    seconds as a safety net (a notification lost in a reconnect is never fatal)."""
    wake = asyncio.Event()

    async def on_reconnect() -> None:
        wake.set()

    unregister = log.on_reconnect(on_reconnect)
    stop = await log.wake_on(subject, wake)
    try:
        yield None
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(WATCH_POLL_S):
                    await wake.wait()
            wake.clear()
            yield None
    finally:
        unregister()
        await stop()


async def watch_job(log: Log, queue: str, job: str) -> AsyncIterator[JobState]:
    """Yields the job's state now (once it exists) and after every change, until finished."""
    history = JobHistory(log, queue, job)
    last: JobState | None = None
    async for _ in _notifications(log, history.subject):
        state = await history.read()
        if state is None or (last is not None and state.last_seq == last.last_seq):
            continue
        last = state
        yield state
        if state.finished:
            return


async def wait_finished(log: Log, queue: str, job: str, timeout: float | None = None) -> JobState:
    """Wait until the job is finished; raises TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        async for state in watch_job(log, queue, job):
            if state.finished:
                return state
    raise JobNotFound(queue, job)


async def watch_queue(log: Log, queue: str) -> AsyncIterator[JobState]:
    """Yields every job of the queue now, then each job again whenever it changes."""
    flt = subjects.jobs_filter(queue)
    by_subject: dict[str, JobFold] = {}  # each event verified and folded once
    next_seq = 1
    folded_under = 0  # the policy version the folds were made under (0: none)
    async for _ in _notifications(log, flt):
        policy = await log.policies.get(queue)
        if (policy.version if policy else 0) != folded_under:
            # the policy changed: every job is folded again under it
            folded_under = policy.version if policy else 0
            by_subject.clear()
            next_seq = 1
        new = await log.read_subject(subjects.JOBS_STREAM, flt, next_seq)
        touched: dict[str, None] = {}
        for ev in new:
            folder = by_subject.get(ev.subject)
            if folder is None:
                try:
                    q, jid = subjects.job_id_from_subject(ev.subject)
                except AsmanError:  # the queue's policy, or junk that is no job's
                    next_seq = ev.seq + 1
                    continue
                folder = by_subject[ev.subject] = JobFold(q, jid, ev.subject, log.rules, policy)
            folder.add(check_event(ev, ev.subject))
            touched[ev.subject] = None
            next_seq = ev.seq + 1
        for subject in touched:
            by_subject[subject].log_rejections()
            state = by_subject[subject].state()
            if state is not None:
                yield state
