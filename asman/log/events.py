"""Job events and the fold that turns a job's verified events into its state.

A job's subject in ``ASMAN_JOBS`` holds its events oldest first. Each is a signed envelope
(``asman.log.wire``). The state is computed, never stored: ``fold`` replays the events,
verifying each signature against its subject and each signer against the rules below, and
ignores (and counts) any event that breaks them.

Who may sign what (open queues):

============  ==================================================================
submitted     anyone; only the first event on the subject counts
claimed       any worker, while the job is queued or running; a claim on top of a
              live claim takes the lease over only with a later ticket delivery
              (the old holder's ack wait passed), so two workers racing on one
              delivery cannot both win
started       the holder of the live claim, same attempt
cancel        the submitter; on a queued job it finishes it as ``cancelled``, on a
              running job it is a request the lease holder acts on
finished      the holder of the live claim, same attempt; ``worker_lost`` by anyone
              once the job has a claim (attempts exhausted, written by whoever
              fetched the ticket)
requeued      anyone, on a finished job (an explicit re-run); attempts start again
released      the holder of the live claim: hands the job back untried (a draining
              worker); the attempt is not counted
============  ==================================================================
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from asman.errors import EnvelopeError
from asman.log import wire

__all__ = [
    "FINISH_REASONS",
    "RESULT_REASONS",
    "Blob",
    "CheckedEvent",
    "HistoryEntry",
    "JobFold",
    "JobState",
    "Lease",
    "OutputFile",
    "RawEvent",
    "Result",
    "check_event",
    "fold",
    "fold_checked",
    "now_ms",
]

logger = logging.getLogger(__name__)

State = Literal["queued", "running", "finished"]
Reason = Literal["success", "failed", "error", "timed_out", "cancelled", "worker_lost"]
FINISH_REASONS: tuple[str, ...] = (
    "success",
    "failed",
    "error",
    "timed_out",
    "cancelled",
    "worker_lost",
)
#: Reasons that are results of the job itself: kept and served from cache on resubmit.
RESULT_REASONS: frozenset[str] = frozenset({"success", "failed", "timed_out"})

MAX_MESSAGE = 4096

_TES = {
    "queued": "QUEUED",
    "running": "RUNNING",
    "success": "COMPLETE",
    "failed": "EXECUTOR_ERROR",
    "timed_out": "EXECUTOR_ERROR",
    "error": "SYSTEM_ERROR",
    "worker_lost": "SYSTEM_ERROR",
    "cancelled": "CANCELED",
}
_CQ_REASON = {
    "success": "Success",
    "failed": "Success",  # compute-queues: a non-zero exit code is still Success
    "error": "Error",
    "timed_out": "TimedOut",
    "cancelled": "Cancelled",
    "worker_lost": "WorkerLost",
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One message read from a job subject: its stream sequence, bytes and server time."""

    seq: int
    data: bytes
    subject: str = ""


@dataclass(frozen=True, slots=True)
class Blob:
    """Bytes kept inline (``data``) or in the blob store (``key``), with their digest."""

    size: int
    sha256: str
    key: str | None = None
    data: bytes | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"size": self.size, "sha256": self.sha256}
        if self.key is not None:
            out["key"] = self.key
        if self.data is not None:
            out["data"] = self.data
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> Blob:
        if not isinstance(obj, Mapping):
            raise ValueError("blob reference must be a map")
        size, sha, key, data = obj.get("size"), obj.get("sha256"), obj.get("key"), obj.get("data")
        if not isinstance(size, int) or size < 0 or not isinstance(sha, str) or len(sha) != 64:
            raise ValueError("blob reference needs size and sha256")
        if key is not None and not isinstance(key, str):
            raise ValueError("blob key must be text")
        if data is not None and not isinstance(data, bytes):
            raise ValueError("inline blob data must be bytes")
        return cls(size=size, sha256=sha, key=key, data=data)


@dataclass(frozen=True, slots=True)
class OutputFile:
    path: str
    blob: Blob

    def to_wire(self) -> dict[str, Any]:
        return {"path": self.path, **self.blob.to_wire()}


@dataclass(frozen=True, slots=True)
class Result:
    """What ``finished`` records."""

    reason: str
    worker: str
    attempt: int
    finished_ms: int
    exit_code: int | None = None
    oom_killed: bool = False
    duration_ms: int | None = None
    message: str = ""
    outputs: tuple[OutputFile, ...] = ()
    log: Blob | None = None

    @property
    def is_result(self) -> bool:
        """True for reasons that are the job's own result (served from cache)."""
        return self.reason in RESULT_REASONS


@dataclass(frozen=True, slots=True)
class Lease:
    """The live claim on a job: who holds it and the fencing sequence to write on top of."""

    worker: str
    attempt: int
    claimed_ms: int
    lease_ms: int
    claim_seq: int
    ticket_seq: int = 0
    delivered: int = 0

    @property
    def delivery(self) -> tuple[int, int]:
        """(ticket stream sequence, delivery count): a claim may only take a live lease over
        with a strictly later delivery, i.e. after the ticket was redelivered."""
        return (self.ticket_seq, self.delivered)


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    seq: int
    type: str
    signer: str
    ts: int
    accepted: bool
    note: str = ""


@dataclass(frozen=True, slots=True)
class JobState:
    queue: str
    job_id: str
    state: State
    definition: dict[str, Any]
    definition_json: str
    submitter: str
    submitted_ms: int
    via: str
    last_seq: int
    claims: int = 0
    lease: Lease | None = None
    started_ms: int | None = None
    cancel_requested: bool = False
    cancel_seq: int | None = None
    result: Result | None = None
    history: tuple[HistoryEntry, ...] = ()
    rejected: int = 0
    job_class: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def reason(self) -> str | None:
        return self.result.reason if self.result else None

    @property
    def tes_state(self) -> str:
        """GA4GH TES state name."""
        if self.result:
            return _TES[self.result.reason]
        if self.state == "running" and self.started_ms is None:
            return "INITIALIZING"
        return _TES[self.state]

    @property
    def cq_state(self) -> tuple[str, str | None]:
        """compute-queues' (state, finishedReason)."""
        if self.result:
            return "Finished", _CQ_REASON[self.result.reason]
        return ("Running" if self.state == "running" else "Queued"), None


def _text(event: Mapping[str, Any], key: str, default: str = "") -> str:
    value = event.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text")
    return value


def _int(event: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = event.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{key} must be an integer")
    return value


def _parse_result(event: Mapping[str, Any], signer: str, attempt: int) -> Result:
    reason = _text(event, "reason")
    if reason not in FINISH_REASONS:
        raise ValueError(f"unknown finish reason {reason!r}")
    exit_code = event.get("exit_code")
    if exit_code is not None and (not isinstance(exit_code, int) or isinstance(exit_code, bool)):
        raise ValueError("exit_code must be an integer")
    duration = event.get("duration_ms")
    if duration is not None and not isinstance(duration, int):
        raise ValueError("duration_ms must be an integer")
    outputs_raw = event.get("outputs", [])
    if not isinstance(outputs_raw, list):
        raise ValueError("outputs must be a list")
    outputs = []
    for item in outputs_raw:
        if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
            raise ValueError("each output needs a path")
        outputs.append(OutputFile(path=item["path"], blob=Blob.from_wire(item)))
    log_ref = event.get("log")
    return Result(
        reason=reason,
        worker=signer,
        attempt=attempt,
        finished_ms=_int(event, "ts", 0),
        exit_code=exit_code,
        oom_killed=bool(event.get("oom_killed", False)),
        duration_ms=duration,
        message=_text(event, "message")[:MAX_MESSAGE],
        outputs=tuple(outputs),
        log=Blob.from_wire(log_ref) if log_ref is not None else None,
    )


def _apply(
    state: JobState | None, seq: int, signer: str, event: Mapping[str, Any], queue: str, job: str
) -> tuple[JobState | None, str]:
    """Apply one verified event. Returns (new state, "" if accepted else why not)."""
    kind = event.get("type")
    ts = _int(event, "ts", 0)
    if state is None:
        if kind != "submitted":
            return None, "the first event of a job must be 'submitted'"
        definition_json = _text(event, "definition")
        definition = json.loads(definition_json)
        if not isinstance(definition, dict):
            return None, "definition must be a JSON object"
        job_class = _text(event, "class", "cpu")
        return (
            JobState(
                queue=queue,
                job_id=job,
                state="queued",
                definition=definition,
                definition_json=definition_json,
                submitter=signer,
                submitted_ms=ts,
                via=_text(event, "via", ""),
                last_seq=seq,
                job_class=job_class if job_class in ("cpu", "gpu") else "cpu",
            ),
            "",
        )
    lease = state.lease
    if kind == "submitted":
        return state, "job already submitted"
    if kind == "claimed":
        if state.finished:
            return state, "job is finished"
        lease_ms = _int(event, "lease_ms")
        delivery = (_int(event, "ticket_seq", 0), _int(event, "delivered", 0))
        if lease is not None and delivery <= lease.delivery:
            return state, "the job is claimed by a delivery as recent as this one"
        attempt = state.claims + 1
        new_lease = Lease(signer, attempt, ts, lease_ms, seq, delivery[0], delivery[1])
        return (
            replace(
                state,
                state="running",
                claims=attempt,
                lease=new_lease,
                started_ms=None,
            ),
            "",
        )
    if kind == "started":
        if lease is None or state.finished:
            return state, "no live claim"
        if signer != lease.worker or _int(event, "attempt") != lease.attempt:
            return state, "only the lease holder may start the job"
        return replace(state, started_ms=ts), ""
    if kind == "cancel":
        if state.finished:
            return state, "job is finished"
        if signer != state.submitter:
            return state, "only the submitter may cancel the job"
        message = _text(event, "message", "cancelled")[:MAX_MESSAGE]
        if state.state == "queued":
            result = Result("cancelled", signer, state.claims, ts, message=message)
            return replace(state, state="finished", result=result, cancel_seq=seq), ""
        return replace(state, cancel_requested=True, cancel_seq=seq), ""
    if kind == "finished":
        if state.finished:
            return state, "job is already finished"
        reason = _text(event, "reason")
        if reason == "worker_lost":
            if state.claims == 0:
                return state, "worker_lost needs an earlier claim"
            result = _parse_result(event, signer, state.claims)
            return replace(state, state="finished", result=result, lease=None), ""
        if lease is None:
            return state, "no live claim"
        if signer != lease.worker or _int(event, "attempt") != lease.attempt:
            return state, "only the lease holder may finish the job"
        result = _parse_result(event, signer, lease.attempt)
        return replace(state, state="finished", result=result, lease=None), ""
    if kind == "requeued":
        if not state.finished:
            return state, "only a finished job can be requeued"
        return (
            replace(
                state,
                state="queued",
                result=None,
                lease=None,
                started_ms=None,
                cancel_requested=False,
                cancel_seq=None,
                claims=0,
            ),
            "",
        )
    if kind == "released":
        if lease is None or state.finished:
            return state, "no live claim"
        if signer != lease.worker or _int(event, "attempt") != lease.attempt:
            return state, "only the lease holder may release the job"
        if state.cancel_requested:
            result = Result("cancelled", signer, lease.attempt, ts, message="cancelled")
            return replace(state, state="finished", result=result, lease=None), ""
        return (
            replace(state, state="queued", lease=None, started_ms=None, claims=state.claims - 1),
            "",
        )
    return state, f"unknown event type {kind!r}"


@dataclass(frozen=True, slots=True)
class CheckedEvent:
    """One event of a job subject after verification: ``opened`` (signer and event) when its
    envelope verified, else None and ``error`` says why it was rejected.

    Folding checked events costs no cryptography, so a peer that follows one job (a lease,
    a watcher) verifies each event once and folds its verified history as often as it likes.
    """

    seq: int
    opened: wire.Opened | None
    error: str = ""


def check_event(raw: RawEvent, subject: str) -> CheckedEvent:
    """Verify one raw event received on ``subject`` (see ``wire.open_envelope``)."""
    try:
        return CheckedEvent(raw.seq, wire.open_envelope(raw.data, subject))
    except (EnvelopeError, ValueError, TypeError) as exc:
        return CheckedEvent(raw.seq, None, str(exc))


def fold(queue: str, job_id: str, subject: str, events: Iterable[RawEvent]) -> JobState | None:
    """The state of a job from its raw events, oldest first. None when nothing valid exists."""
    return fold_checked(queue, job_id, subject, (check_event(raw, subject) for raw in events))


def fold_checked(
    queue: str, job_id: str, subject: str, events: Iterable[CheckedEvent]
) -> JobState | None:
    """``fold`` over events already verified by ``check_event`` (or known first-hand: an
    event this peer signed and the log accepted). Rejected events are counted."""
    folder = JobFold(queue, job_id, subject)
    for checked in events:
        folder.add(checked)
    return folder.state()


class JobFold:
    """``fold_checked`` one event at a time: a peer that follows a job adds each new event
    once instead of replaying the whole history."""

    __slots__ = (
        "_cached",
        "_history",
        "_last_seq",
        "_rejected",
        "_state",
        "job_id",
        "queue",
        "subject",
    )

    def __init__(self, queue: str, job_id: str, subject: str) -> None:
        self.queue = queue
        self.job_id = job_id
        self.subject = subject
        self._state: JobState | None = None
        self._history: list[HistoryEntry] = []
        self._rejected = 0
        self._last_seq = 0
        self._cached: JobState | None = None

    def add(self, checked: CheckedEvent) -> None:
        """Apply the next event (oldest first)."""
        self._cached = None
        self._last_seq = checked.seq
        opened = checked.opened
        try:
            if opened is None:
                raise ValueError(checked.error)
            kind = str(opened.event.get("type", "?"))
            ts = opened.event.get("ts", 0)
            self._state, why = _apply(
                self._state, checked.seq, opened.signer, opened.event, self.queue, self.job_id
            )
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            self._rejected += 1
            logger.warning("rejected event seq=%d on %s: %s", checked.seq, self.subject, exc)
            self._history.append(HistoryEntry(checked.seq, "?", "", 0, False, str(exc)))
            return
        if why:
            self._rejected += 1
            logger.info("ignored %s event seq=%d on %s: %s", kind, checked.seq, self.subject, why)
        self._history.append(
            HistoryEntry(
                checked.seq, kind, opened.signer, ts if isinstance(ts, int) else 0, not why, why
            )
        )

    def state(self) -> JobState | None:
        """The job's state after the events added so far (None when nothing valid yet)."""
        if self._state is None:
            return None
        if self._cached is None:
            self._cached = replace(
                self._state,
                last_seq=self._last_seq,
                history=tuple(self._history),
                rejected=self._rejected,
            )
        return self._cached
