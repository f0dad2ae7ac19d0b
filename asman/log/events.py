"""Job events and the fold that turns a job's verified events into its state.

A job's subject in ``ASMAN_JOBS`` holds its events oldest first. Each is a signed envelope
(``asman.log.wire``). The state is computed, never stored: ``fold`` replays the messages,
verifying each envelope against its subject, each event's place in the chain, and each signer
against the rules below, and ignores (and counts) any message that breaks them.

Nothing a signer declares decides who holds a job. Times that matter are the NATS server's
own timestamps of the messages (``RawEvent.ts``), which no client can forge:

* **Chained.** Every event names the sequence of the message it was appended on (``prev``;
  0 for the first message of the subject). Events are appended by compare-and-set on that
  sequence, so an envelope published again at another place is refused: no replay.
* **Bound.** ``submitted`` counts only if its definition hashes to the subject's job id.
* **Leases in server time.** A claim on a queued job takes the lease. A claim on a held job
  is a *challenge*: the holder must answer (any event of its own: ``renewed``, ``started``,
  ``finished``, ``released``) within ``Rules.lease_ms`` of the challenge in server time, or
  the challenger holds the lease from the first of its events after that. A healthy holder
  writes nothing to keep its lease; only a challenge costs it one event. A lease held longer
  than the job's life (twice its ``maxDuration`` plus an allowance) can no longer be kept by
  answering.
* **Bounded.** A subject holds at most ``Rules.max_events`` messages (JetStream refuses more)
  and the fold reads at most ``Rules.max_history_bytes``; a job that reaches either unfinished
  ends ``error`` ("history over limit").

Who may sign what, and what the fold does otherwise (docs/architecture.md has the same table):

============  ==================================================================
submitted     anyone, as the first valid event; the definition must hash to the job id.
              Its signer is the job's *submitter*. Holds the job for its ``namespace``
              (``_`` when it names none); its ``control`` (callbacks, not part of the
              job) is the job's
hold          anyone, on a job not finished and not being cancelled: holds it for the
              signer's ``namespace`` (again: the signer's hold becomes the newest)
claimed       anyone, on a job not finished: takes a queued job (attempt = claims + 1),
              or challenges the holder of a running one (one challenge at a time)
renewed       the holder (answers a challenge), or the challenger past the grace (takes
              the lease over)
started       the holder, same attempt
cancel        with a ``namespace`` (or ``*``): removes the holds of that name the signer
              may remove: its own, or any when it is the submitter. A stranger's key
              removes nothing it did not add. With ``replaced_by`` (the job that replaced
              this one in the namespace) only the signer's own hold goes, and with
              ``hold`` only if it is still the hold of that sequence. When no hold is
              left the job is cancelled as below.
              Without a namespace: the submitter only, every hold at once. Cancelling:
              a queued job is finished ``cancelled``; a running one gets a cancel
              request; a second cancel ``lease_ms`` after the request (by the submitter
              or the key that requested it), with the job still unfinished, finishes it
              ``cancelled``
finished      the holder, same attempt; a holder whose attempt is past ``max_attempts``
              (it took a dead worker's job over once too often) may only write
              ``worker_lost``
released      the holder: the job goes back to queued, the attempt is not counted (a
              draining worker); on a job with a cancel request it finishes it ``cancelled``
requeued      on a finished job: anyone when it finished without a result (``error``,
              ``cancelled``, ``worker_lost``); only the submitter when it has one. Holds
              the job for the signer's ``namespace``. The submitter's may bring a new
              ``control``; anyone else's keeps the job's
============  ==================================================================

Under a queue policy (``asman.log.policy``, the version in force at the event's server
time) the same rules hold, narrowed: ``submitted`` and ``hold`` only from a key it lets
submit (and ``submitted`` within its ceilings); ``claimed`` only from a worker it trusts
(listed, or carrying a certificate it accepts); the holder's events only while it still
trusts the holder. Its admins may do what the submitter may (``cancel``, forcing a cancel,
``requeued`` of a result), and anyone may re-run a result past its retention; the control
stays the submitter's all the same: only the submitter's ``requeued`` brings a new one.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from asman.errors import EnvelopeError, InvalidDefinition, InvalidInput
from asman.log import wire
from asman.log.control import (
    ALL_NAMESPACES,
    DEFAULT_NAMESPACE,
    validate_control,
    validate_namespace,
)
from asman.log.definition import job_id as definition_job_id
from asman.log.definition import parse_duration_ms
from asman.log.policy import Policy, PolicyView, check_cert

__all__ = [
    "ALL_NAMESPACES",
    "DEFAULT_NAMESPACE",
    "FINISH_REASONS",
    "RESULT_REASONS",
    "Blob",
    "Challenge",
    "CheckedEvent",
    "HistoryEntry",
    "Hold",
    "JobFold",
    "JobState",
    "Lease",
    "OutputFile",
    "RawEvent",
    "Result",
    "Rules",
    "StepResult",
    "check_event",
    "fold",
    "fold_checked",
    "now_ms",
    "validate_namespace",
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
OVER_LIMIT = "history over limit"


@dataclass(frozen=True, slots=True)
class Hold:
    """A namespace holding a job (compute-queues §3.4): added by ``key`` with the event at
    stream sequence ``seq``. Sequences are one order for the whole stream, so of two holds
    with one name and one key, the higher ``seq`` is the newer submission."""

    namespace: str
    key: str
    seq: int


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
class Rules:
    """The protocol's numbers. Every peer folding a job must use the same ones: they come
    from the jobs stream's metadata (``asman.log.connection``), so one deployment has one set.
    """

    #: a challenged holder has this long (server time) to answer
    lease_ms: int = 30_000
    #: attempts (accepted claims) before a job ends ``worker_lost``
    max_attempts: int = 3
    #: messages one job subject may hold (JetStream refuses the next one)
    max_events: int = 512
    #: bytes of a job's history the fold reads
    max_history_bytes: int = 8 * 1024 * 1024
    #: a job's life when its definition has no ``maxDuration``
    default_duration_ms: int = 24 * 3600 * 1000
    #: added to twice the ``maxDuration`` for pulls, builds, inputs and outputs
    life_allowance_ms: int = 15 * 60 * 1000

    def life_ms(self, definition: Mapping[str, Any]) -> int:
        """How long one attempt may keep its lease by answering challenges."""
        durations = []
        req = definition.get("requirements")
        for value in (
            definition.get("maxDuration"),
            req.get("maxDuration") if isinstance(req, Mapping) else None,
        ):
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                with contextlib.suppress(InvalidDefinition):
                    durations.append(parse_duration_ms(value, "maxDuration"))
        duration = min(durations) if durations else self.default_duration_ms
        return 2 * duration + self.life_allowance_ms


DEFAULT_RULES = Rules()


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One message read from a job subject: its stream sequence, bytes, subject and the
    server's timestamp (ms; None when not known, e.g. our own append not read back)."""

    seq: int
    data: bytes
    subject: str = ""
    ts: int | None = None


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


def parse_outputs(items: Any) -> tuple[OutputFile, ...]:
    """An outputs list as written in ``finished`` (or in its manifest blob)."""
    if not isinstance(items, list):
        raise ValueError("outputs must be a list")
    outputs = []
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("path"), str):
            raise ValueError("each output needs a path")
        outputs.append(OutputFile(path=item["path"], blob=Blob.from_wire(item)))
    return tuple(outputs)


@dataclass(frozen=True, slots=True)
class StepResult:
    """How one step of a multi-step job ended (``finished.steps``): its exit code (None: it
    never ran to an exit), its times, and the tails of its stdout and stderr."""

    name: str
    exit_code: int | None
    started_ms: int | None = None
    ended_ms: int | None = None
    stdout: str = ""
    stderr: str = ""

    @classmethod
    def from_wire(cls, obj: Any) -> StepResult:
        if not isinstance(obj, Mapping):
            raise ValueError("a step result must be a map")
        ints = {k: obj.get(k) for k in ("exit_code", "started_ms", "ended_ms")}
        for k, v in ints.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ValueError(f"steps: {k} must be an integer")
        return cls(
            name=_text(obj, "name")[:256],
            exit_code=ints["exit_code"],
            started_ms=ints["started_ms"],
            ended_ms=ints["ended_ms"],
            stdout=_text(obj, "stdout")[:MAX_MESSAGE],
            stderr=_text(obj, "stderr")[:MAX_MESSAGE],
        )


@dataclass(frozen=True, slots=True)
class Result:
    """What ``finished`` records. A large outputs list is kept in a blob (``manifest``, CBOR
    of the same list) so that a result always fits in one message; ``outputs`` is then empty
    until a reader loads it (``asman.peer.client.load_outputs``)."""

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
    manifest: Blob | None = None
    #: the worker was one the queue's policy trusts (listed or certified) when it wrote the
    #: result; False on an open queue, where any worker's result counts
    vetted: bool = False
    #: a ``cancelled`` job that a newer job replaced in its namespace (compute-queues'
    #: ``JobReplacedByClient``): that job's id
    replaced_by: str | None = None
    #: a multi-step job's steps, in order, as far as they ran
    steps: tuple[StepResult, ...] = ()

    @property
    def is_result(self) -> bool:
        """True for reasons that are the job's own result (served from cache)."""
        return self.reason in RESULT_REASONS


@dataclass(frozen=True, slots=True)
class Challenge:
    """A claim on a job someone else holds: the holder must answer before ``ts + lease_ms``
    (server time), or ``by`` takes the lease over."""

    by: str
    seq: int
    ts: int | None  # server time; None while only known first-hand
    proc: str = ""  # the challenger's process under its key
    certifier: str = ""  # the challenger's certificate (a policy trusting certified workers)
    cert_until: int = 0


@dataclass(frozen=True, slots=True)
class Lease:
    """The live claim on a job: who holds it and the fencing sequence of the claim."""

    worker: str
    attempt: int
    claimed_ms: int | None  # server time of the claim (None: only known first-hand)
    claim_seq: int
    life_ms: int
    challenge: Challenge | None = None
    #: the holder's process under its key: processes sharing a key are different holders
    proc: str = ""
    #: the certificate the holder claimed with (a queue policy trusting certified workers):
    #: its certifier and its end (server time)
    certifier: str = ""
    cert_until: int = 0

    def held_by(self, signer: str, proc: str) -> bool:
        return signer == self.worker and proc == self.proc

    def challenge_due_ms(self, rules: Rules = DEFAULT_RULES) -> int | None:
        """Server time from which a pending challenge takes the lease over."""
        c = self.challenge
        return None if c is None or c.ts is None else c.ts + rules.lease_ms

    def expired(self, server_now_ms: int) -> bool:
        """Whether the lease is past its life at ``server_now_ms``: it can no longer be kept
        by answering a challenge."""
        return self.claimed_ms is not None and server_now_ms >= self.claimed_ms + self.life_ms


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
    cancel_ms: int | None = None
    result: Result | None = None
    history: tuple[HistoryEntry, ...] = ()
    rejected: int = 0
    job_class: str = "cpu"
    life_ms: int = 0
    #: every key that held a lease on this job (whose log chunks count)
    holders: frozenset[str] = frozenset()
    #: messages and bytes on the subject so far (junk included)
    events: int = 0
    history_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    #: the namespaces holding the job, oldest hold first (compute-queues §3.4)
    holds: tuple[Hold, ...] = ()
    #: the key whose cancel asked a running job to stop (it may force the cancel too)
    cancel_by: str = ""
    #: the job that replaced this one in its last namespace (carried into its result)
    replaced_by: str | None = None
    #: the submission's checked ``control`` (``asman.log.control``): callbacks, namespace
    control: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.state == "finished"

    @property
    def namespaces(self) -> tuple[str, ...]:
        """The names of the namespaces holding the job, sorted, each once."""
        return tuple(sorted({h.namespace for h in self.holds}))

    def hold_of(self, key: str, namespace: str) -> Hold | None:
        """``key``'s hold of the job for ``namespace``, if it has one."""
        for h in self.holds:
            if h.key == key and h.namespace == namespace:
                return h
        return None

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
        """compute-queues' (state, finishedReason). A job cancelled because a newer one
        replaced it in its namespace is ``JobReplacedByClient``."""
        if self.result:
            if self.result.reason == "cancelled" and self.result.replaced_by:
                return "Finished", "JobReplacedByClient"
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


def _parse_result(event: Mapping[str, Any], signer: str, attempt: int, ts: int) -> Result:
    reason = _text(event, "reason")
    if reason not in FINISH_REASONS:
        raise ValueError(f"unknown finish reason {reason!r}")
    exit_code = event.get("exit_code")
    if exit_code is not None and (not isinstance(exit_code, int) or isinstance(exit_code, bool)):
        raise ValueError("exit_code must be an integer")
    duration = event.get("duration_ms")
    if duration is not None and (not isinstance(duration, int) or isinstance(duration, bool)):
        raise ValueError("duration_ms must be an integer")
    outputs = parse_outputs(event.get("outputs", []))
    log_ref = event.get("log")
    manifest_ref = event.get("manifest")
    steps = event.get("steps", [])
    if not isinstance(steps, list) or len(steps) > 256:
        raise ValueError("steps must be a list of at most 256 step results")
    return Result(
        reason=reason,
        worker=signer,
        attempt=attempt,
        finished_ms=ts,
        exit_code=exit_code,
        oom_killed=bool(event.get("oom_killed", False)),
        duration_ms=duration,
        message=_text(event, "message")[:MAX_MESSAGE],
        outputs=outputs,
        log=Blob.from_wire(log_ref) if log_ref is not None else None,
        manifest=Blob.from_wire(manifest_ref) if manifest_ref is not None else None,
        steps=tuple(StepResult.from_wire(s) for s in steps),
    )


@dataclass(frozen=True, slots=True)
class _Event:
    """One verified, chained event as ``_apply`` sees it."""

    seq: int
    signer: str
    body: Mapping[str, Any]
    kind: str
    ts: int | None  # server time (ms), None when only known first-hand

    @property
    def proc(self) -> str:
        """The signer's process (``Log.session``), for the events a worker process writes."""
        value = self.body.get("proc", "")
        if not isinstance(value, str) or len(value) > 32:
            raise ValueError("proc must be text of at most 32 characters")
        return value

    @property
    def when(self) -> int:
        """The event's time for display: the signer's (``ts``). Rules use the server's time
        (``ts`` of the message), never this; display uses what every peer has, including
        the signer before it reads its own event back."""
        value = self.body.get("ts", 0)
        return value if type(value) is int else 0


def _control(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``control`` an event carries (JSON text), checked; None when it carries none or
    one that does not check (a job is never refused for its control: it is not the job)."""
    text = event.get("control")
    if not isinstance(text, str):
        return None
    try:
        return validate_control(json.loads(text))
    except (ValueError, InvalidInput):
        return None


def _submitted(
    ev: _Event, queue: str, job: str, rules: Rules, policy: Policy | None
) -> tuple[JobState | None, str]:
    if ev.kind != "submitted":
        return None, "the first event of a job must be 'submitted'"
    definition_json = _text(ev.body, "definition")
    definition = json.loads(definition_json)
    if not isinstance(definition, dict):
        return None, "definition must be a JSON object"
    try:
        computed = definition_job_id(definition)
    except InvalidDefinition as exc:
        return None, f"definition has no job id: {exc}"
    if computed != job:
        return None, f"definition hashes to job {computed[:12]}, not to this job"
    if policy is not None:
        if not policy.may_submit(ev.signer):
            return None, f"the queue's policy does not let {ev.signer[:12]} submit"
        over = policy.ceilings.refusal(definition)
        if over:
            return None, f"the queue's policy refuses the job: {over}"
    job_class = _text(ev.body, "class", "cpu")
    namespace = _namespace(ev.body)
    return (
        JobState(
            queue=queue,
            job_id=job,
            state="queued",
            definition=definition,
            definition_json=definition_json,
            submitter=ev.signer,
            submitted_ms=ev.when,
            via=_text(ev.body, "via", ""),
            last_seq=ev.seq,
            job_class=job_class if job_class in ("cpu", "gpu") else "cpu",
            life_ms=rules.life_ms(definition),
            holds=(Hold(namespace, ev.signer, ev.seq),),
            control=_control(ev.body) or {},
        ),
        "",
    )


def _namespace(body: Mapping[str, Any], *, allow_all: bool = False) -> str:
    """The event's ``namespace`` (``_`` when it names none)."""
    try:
        return validate_namespace(body.get("namespace", DEFAULT_NAMESPACE), allow_all=allow_all)
    except InvalidInput as exc:
        raise ValueError(str(exc)) from None


def _with_hold(state: JobState, namespace: str, signer: str, seq: int) -> tuple[Hold, ...]:
    """The job's holds with ``signer``'s for ``namespace`` made the newest."""
    kept = tuple(h for h in state.holds if not (h.key == signer and h.namespace == namespace))
    return (*kept, Hold(namespace, signer, seq))


def _replaced_by(body: Mapping[str, Any], job: str) -> str | None:
    value = body.get("replaced_by")
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value) != 64
        or value.strip("0123456789abcdef")
        or value == job
    ):
        raise ValueError("replaced_by must be the id of another job (64 lower-case hex)")
    return value


def _cancel(
    state: JobState, ev: _Event, rules: Rules, policy: Policy | None = None
) -> tuple[JobState, str]:
    """A ``cancel`` on a job not finished (see the module docstring for who may sign it); a
    queue admin (its policy) may do what the submitter may."""
    signer = ev.signer
    admin = policy is not None and policy.is_admin(signer)
    message = _text(ev.body, "message", "cancelled")[:MAX_MESSAGE]
    if state.cancel_requested:
        # a second cancel ends the job without its worker, once that had its grace to stop
        if signer not in (state.submitter, state.cancel_by) and not admin:
            return state, "only the submitter (or a queue admin) may cancel the job"
        if ev.ts is None or state.cancel_ms is None or ev.ts < state.cancel_ms + rules.lease_ms:
            return state, "a cancel is already requested; the worker is stopping the job"
        result = Result(
            "cancelled",
            signer,
            state.claims,
            ev.when,
            message=f"{message} (the worker did not stop the job in time)",
            replaced_by=state.replaced_by,
        )
        return replace(state, state="finished", result=result, lease=None), ""
    if "namespace" in ev.body:
        namespace = _namespace(ev.body, allow_all=True)
        named = [h for h in state.holds if namespace in (ALL_NAMESPACES, h.namespace)]
        if not named:
            return state, f"namespace {namespace!r} does not hold the job"
        replaced_by = _replaced_by(ev.body, state.job_id)
        if replaced_by is None:
            removed = {h for h in named if admin or signer in (state.submitter, h.key)}
        else:
            # a replacement moves the signer's own hold to the newer job, and only the
            # hold it saw (``hold``: its sequence), not one renewed since
            seen = ev.body.get("hold")
            removed = {h for h in named if h.key == signer and seen in (None, h.seq)}
            if not removed and any(h.key == signer for h in named):
                return state, f"the hold of namespace {namespace!r} was renewed since"
        if not removed:
            return state, (
                f"only the peer that added namespace {named[0].namespace!r}, or the job's "
                "submitter, may remove it"
            )
        left = tuple(h for h in state.holds if h not in removed)
        if left:
            return replace(state, holds=left), ""  # others still hold the job: it goes on
        state = replace(state, holds=(), replaced_by=replaced_by)
    elif signer != state.submitter and not admin:
        return state, "only the submitter (or a queue admin) may cancel the job"
    else:
        state = replace(state, holds=())
    if state.state == "queued":
        result = Result(
            "cancelled",
            signer,
            state.claims,
            ev.when,
            message=message,
            replaced_by=state.replaced_by,
        )
        return replace(state, state="finished", result=result, cancel_seq=ev.seq), ""
    return (
        replace(state, cancel_requested=True, cancel_seq=ev.seq, cancel_ms=ev.ts, cancel_by=signer),
        "",
    )


def _resolve(state: JobState, ev: _Event, rules: Rules) -> tuple[JobState, str]:
    """A challenge nobody answered in time: from the first event at or past its due time,
    the challenger holds the lease (another attempt)."""
    lease = state.lease
    if lease is None or lease.challenge is None or ev.ts is None:
        return state, ""
    due = lease.challenge_due_ms(rules)
    if due is None or ev.ts < due:
        return state, ""
    c = lease.challenge
    attempt = state.claims + 1
    taken = Lease(
        c.by,
        attempt,
        c.ts,
        c.seq,
        state.life_ms,
        proc=c.proc,
        certifier=c.certifier,
        cert_until=c.cert_until,
    )
    note = f"the lease of {lease.worker[:12]} passed to {c.by[:12]} (challenge unanswered)"
    return (
        replace(
            state, claims=attempt, lease=taken, started_ms=None, holders=state.holders | {c.by}
        ),
        note,
    )


def _holder_answers(state: JobState, ev: _Event) -> tuple[JobState, str]:
    """Any event of the holder proves it alive: a pending challenge is void, unless the
    lease is past its life (then only a result or a release still counts)."""
    lease = state.lease
    assert lease is not None
    c = lease.challenge
    if c is None:
        return state, ""
    if c.ts is not None and lease.expired(c.ts) and ev.kind in ("renewed", "started"):
        return state, "the lease is past the job's life: it cannot be kept"
    return replace(state, lease=replace(lease, challenge=None)), ""


def _claim_trust(policy: Policy | None, ev: _Event, queue: str) -> tuple[str, str, int]:
    """Whether a claim counts under ``policy``: ("", certifier, certificate end) when it
    does (certifier "" when the signer needs no certificate), else (why not, "", 0)."""
    if policy is None or policy.lists_worker(ev.signer):
        return "", "", 0
    refused = (
        f"the queue's policy does not trust {ev.signer[:12]} as a worker "
        "(not listed, and no valid certificate)"
    )
    cert_data = ev.body.get("cert")
    if cert_data is None or not policy.certifiers:
        return refused, "", 0
    try:
        cert = check_cert(cert_data)
    except ValueError as exc:
        return f"{refused}: {exc}", "", 0
    now = ev.ts if ev.ts is not None else now_ms()
    if not policy.accepts(cert, ev.signer, queue, now):
        return f"{refused}: the certificate is not one this queue accepts now", "", 0
    return "", cert.certifier, cert.until_ms


def holder_trusted(policy: Policy | None, lease: Lease, ts: int | None) -> bool:
    """Whether ``policy`` trusts the holder of ``lease`` at server time ``ts``."""
    if policy is None or policy.lists_worker(lease.worker):
        return True
    if not lease.certifier or lease.certifier not in policy.certifiers:
        return False
    return ts is None or ts < lease.cert_until


def past_retention(state: JobState, policy: Policy | None, at_ms: int | None) -> bool:
    """A finished job older than its queue's retention (``Policy.retention_ms``, counted from
    its result): no longer listed, and anyone may run it again."""
    if policy is None or policy.retention_ms is None or state.result is None:
        return False
    now = at_ms if at_ms is not None else now_ms()
    return now - state.result.finished_ms > policy.retention_ms


def _may_administer(state: JobState, signer: str, policy: Policy | None) -> bool:
    return signer == state.submitter or (policy is not None and policy.is_admin(signer))


def _apply(
    state: JobState, ev: _Event, rules: Rules, policy: Policy | None = None
) -> tuple[JobState, str]:
    """Apply one verified, chained event to an existing job, under the queue policy in
    force at the event's time (None: an open queue). Returns (new state, "" if accepted
    else why not)."""
    kind, signer = ev.kind, ev.signer
    lease = state.lease
    if kind == "submitted":
        return state, "job already submitted"
    if kind == "claimed":
        if state.finished:
            return state, "job is finished"
        why, certifier, cert_until = _claim_trust(policy, ev, state.queue)
        if why:
            return state, why
        if lease is None:
            attempt = state.claims + 1
            new = Lease(
                signer,
                attempt,
                ev.ts,
                ev.seq,
                state.life_ms,
                proc=ev.proc,
                certifier=certifier,
                cert_until=cert_until,
            )
            return (
                replace(
                    state,
                    state="running",
                    claims=attempt,
                    lease=new,
                    started_ms=None,
                    holders=state.holders if signer in state.holders else state.holders | {signer},
                ),
                "",
            )
        if lease.held_by(signer, ev.proc):
            return state, "the signer already holds the lease"
        if lease.challenge is not None:
            return state, "a challenge is already pending"
        challenge = Challenge(signer, ev.seq, ev.ts, ev.proc, certifier, cert_until)
        return replace(state, lease=replace(lease, challenge=challenge)), ""
    if kind == "hold":
        if state.finished:
            return state, "job is finished"
        if policy is not None and not policy.may_submit(signer):
            return state, f"the queue's policy does not let {signer[:12]} submit (nor hold)"
        if state.cancel_requested:
            return state, "the job is being cancelled"
        holds = _with_hold(state, _namespace(ev.body), signer, ev.seq)
        return replace(state, holds=holds), ""
    if kind == "cancel":
        if state.finished:
            return state, "job is finished"
        return _cancel(state, ev, rules, policy)
    if kind == "requeued":
        if not state.finished:
            return state, "only a finished job can be requeued"
        assert state.result is not None
        if (
            state.result.is_result
            and not _may_administer(state, signer, policy)
            and not past_retention(state, policy, ev.ts)
        ):
            return state, "only the submitter (or a queue admin) may re-run a job that has a result"
        # the submitter's re-run may bring a new control; anyone else's keeps the job's
        control = _control(ev.body) if signer == state.submitter else None
        return (
            replace(
                state,
                control=state.control if control is None else control,
                state="queued",
                result=None,
                lease=None,
                started_ms=None,
                cancel_requested=False,
                cancel_seq=None,
                cancel_ms=None,
                cancel_by="",
                replaced_by=None,
                claims=0,
                holds=_with_hold(state, _namespace(ev.body), signer, ev.seq),
            ),
            "",
        )
    if kind not in ("renewed", "started", "finished", "released"):
        return state, f"unknown event type {kind!r}"
    # the holder's events
    if lease is None or state.finished:
        return state, "no live claim"
    if not lease.held_by(signer, ev.proc):
        return state, f"only the lease holder may write '{kind}'"
    if not holder_trusted(policy, lease, ev.ts):
        return state, f"the queue's policy no longer trusts {signer[:12]} as a worker"
    if kind != "renewed" and _int(ev.body, "attempt") != lease.attempt:
        return state, "the event is for another attempt"
    state, why = _holder_answers(state, ev)
    if why:
        return state, why
    lease = state.lease
    assert lease is not None
    if kind == "renewed":
        return state, ""
    if kind == "started":
        if lease.attempt > rules.max_attempts:
            return state, (
                f"attempt {lease.attempt} is past the {rules.max_attempts} allowed: "
                "it may only end the job worker_lost"
            )
        return replace(state, started_ms=ev.when), ""
    if kind == "finished":
        result = _parse_result(ev.body, signer, lease.attempt, ev.when)
        if policy is not None and policy.workers is not None:
            result = replace(result, vetted=True)
        if lease.attempt > rules.max_attempts and result.reason != "worker_lost":
            return state, (
                f"attempt {lease.attempt} is past the {rules.max_attempts} allowed: "
                "only worker_lost may end it"
            )
        if result.reason == "cancelled" and state.cancel_requested:
            result = replace(result, replaced_by=state.replaced_by)
        return replace(state, state="finished", result=result, lease=None), ""
    # released
    if state.cancel_requested:
        result = Result(
            "cancelled",
            signer,
            lease.attempt,
            ev.when,
            message="cancelled",
            replaced_by=state.replaced_by,
        )
        return replace(state, state="finished", result=result, lease=None), ""
    return (
        replace(state, state="queued", lease=None, started_ms=None, claims=state.claims - 1),
        "",
    )


@dataclass(frozen=True, slots=True)
class CheckedEvent:
    """One message of a job subject after verification: ``opened`` (signer and event) when
    its envelope verified, else None and ``error`` says why it was rejected. ``ts`` is the
    server's timestamp (None when known only first-hand) and ``size`` the message's bytes.

    Folding checked events costs no cryptography, so a peer that follows one job (a lease,
    a watcher) verifies each event once and folds its verified history as often as it likes.
    """

    seq: int
    opened: wire.Opened | None
    error: str = ""
    ts: int | None = None
    size: int = 0


def check_event(raw: RawEvent, subject: str) -> CheckedEvent:
    """Verify one raw event received on ``subject`` (see ``wire.open_envelope``)."""
    try:
        opened = wire.open_envelope(raw.data, subject)
    except (EnvelopeError, ValueError, TypeError) as exc:
        return CheckedEvent(raw.seq, None, str(exc), raw.ts, len(raw.data))
    return CheckedEvent(raw.seq, opened, "", raw.ts, len(raw.data))


def fold(
    queue: str,
    job_id: str,
    subject: str,
    events: Iterable[RawEvent],
    rules: Rules = DEFAULT_RULES,
    policy: PolicyView | None = None,
) -> JobState | None:
    """The state of a job from its raw events, oldest first. None when nothing valid exists."""
    return fold_checked(
        queue, job_id, subject, (check_event(raw, subject) for raw in events), rules, policy
    )


def fold_checked(
    queue: str,
    job_id: str,
    subject: str,
    events: Iterable[CheckedEvent],
    rules: Rules = DEFAULT_RULES,
    policy: PolicyView | None = None,
) -> JobState | None:
    """``fold`` over events already verified by ``check_event`` (or known first-hand: an
    event this peer signed and the log accepted). Rejected events are counted, and logged
    once for the whole fold."""
    folder = JobFold(queue, job_id, subject, rules, policy)
    for checked in events:
        if folder.full:
            break
        folder.add(checked)
    folder.log_rejections()
    return folder.state()


def _hand_on(state: JobState, policy: Policy | None, ts: int | None) -> JobState:
    """A job whose holder ``policy`` no longer trusts at server time ``ts`` goes back to the
    queue (the attempt is not counted): a revoked worker's job is handed on."""
    lease = state.lease
    if policy is None or lease is None or state.finished:
        return state
    if holder_trusted(policy, lease, ts):
        return state
    return replace(
        state,
        state="queued",
        lease=None,
        started_ms=None,
        claims=max(0, state.claims - 1),
        extra={**state.extra, "revoked": lease.worker},
    )


def _category(why: str, opened: bool) -> str:
    """A short name for a rejection, for the aggregated warning."""
    if not opened:
        return "bad signature" if "signature" in why else "not a signed event of this job"
    for words, name in (
        ("queue's policy", "refused by the queue's policy"),
        ("out of chain", "out of chain"),
        ("wire v", "other wire version"),
        ("hashes to", "definition not of this job"),
        ("only the", "unauthorized signer"),
    ):
        if words in why:
            return name
    return "not allowed now"


@dataclass(slots=True)
class _Snapshot:
    state: JobState | None
    history: int
    rejected: int
    last_seq: int
    events: int
    history_bytes: int
    full: bool


class JobFold:
    """``fold_checked`` one event at a time: a peer that follows a job adds each new event
    once instead of replaying the whole history.

    ``mark()`` saves the fold before events known only first-hand (our own appends, whose
    server time we do not know yet); ``rewind()`` goes back there, so that the same events,
    read back with their server times, are folded again.
    """

    __slots__ = (
        "_bytes",
        "_cached",
        "_count",
        "_history",
        "_last_seq",
        "_mark",
        "_rejected",
        "_rejections",
        "_state",
        "full",
        "job_id",
        "policy",
        "queue",
        "rules",
        "subject",
    )

    def __init__(
        self,
        queue: str,
        job_id: str,
        subject: str,
        rules: Rules = DEFAULT_RULES,
        policy: PolicyView | None = None,
    ) -> None:
        self.queue = queue
        self.job_id = job_id
        self.subject = subject
        #: the queue's policy versions (None or empty: an open queue)
        self.policy = policy if policy is not None and policy.versions else None
        current = self.policy.current if self.policy else None
        if current is not None and current.lease_ms is not None:
            rules = replace(rules, lease_ms=current.lease_ms)
        self.rules = rules
        self.full = False  # the history reached a limit: nothing more is read
        self._state: JobState | None = None
        self._history: list[HistoryEntry] = []
        self._rejected = 0
        self._rejections: collections.Counter[str] = collections.Counter()
        self._last_seq = 0  # sequence of the last message on the subject (any message)
        self._count = 0
        self._bytes = 0
        self._cached: JobState | None = None
        self._mark: _Snapshot | None = None

    @property
    def last_seq(self) -> int:
        return self._last_seq

    def mark(self) -> None:
        """Save the fold as it is (once: a later mark keeps the first)."""
        if self._mark is None:
            self._mark = _Snapshot(
                self._state,
                len(self._history),
                self._rejected,
                self._last_seq,
                self._count,
                self._bytes,
                self.full,
            )

    def rewind(self) -> None:
        """Back to the last ``mark()`` (nothing if none)."""
        m, self._mark = self._mark, None
        if m is None:
            return
        self._state = m.state
        del self._history[m.history :]
        self._rejected = m.rejected
        self._last_seq = m.last_seq
        self._count = m.events
        self._bytes = m.history_bytes
        self.full = m.full
        self._cached = None

    def add(self, checked: CheckedEvent) -> None:
        """Apply the next message of the subject (oldest first)."""
        if self.full:
            return
        self._cached = None
        prev, self._last_seq = self._last_seq, checked.seq
        self._count += 1
        self._bytes += checked.size
        rules = self.rules
        if self._bytes > rules.max_history_bytes:
            self._over_limit(checked, f"over {rules.max_history_bytes} bytes")
            return
        kind, signer, ts, why, note = "?", "", 0, "", ""
        try:
            opened = checked.opened
            if opened is None:
                raise ValueError(checked.error)
            body = opened.event
            signer = opened.signer
            kind = str(body.get("type", "?"))
            ev = _Event(checked.seq, signer, body, kind, checked.ts)
            ts = ev.when
            version = body.get("v")
            if version != wire.SCHEMA_VERSION:
                why = (
                    f"wire v{version} event, this peer reads v{wire.SCHEMA_VERSION}: it was "
                    "written by another Asman version (docs/architecture.md, upgrading)"
                )
            elif body.get("prev") != prev:
                why = (
                    f"out of chain: names {body.get('prev')!r} as the message before it, "
                    f"which was {prev} (a replay, or an append without compare-and-set)"
                )
            else:
                policy = self.policy.at(checked.ts) if self.policy else None
                if self._state is None:
                    self._state, why = _submitted(ev, self.queue, self.job_id, rules, policy)
                else:
                    self._state = _hand_on(self._state, policy, checked.ts)
                    self._state, note = _resolve(self._state, ev, rules)
                    self._state, why = _apply(self._state, ev, rules, policy)
        except (ValueError, TypeError, json.JSONDecodeError) as exc:
            why = str(exc) or type(exc).__name__
        if why:
            self._rejected += 1
            self._rejections[_category(why, checked.opened is not None)] += 1
        text = f"{note}; {why}" if note and why else (why or note)
        self._history.append(HistoryEntry(checked.seq, kind, signer, ts, not why, text))
        if self._count >= rules.max_events:
            self._over_limit(checked, f"{rules.max_events} messages")

    def _over_limit(self, checked: CheckedEvent, what: str) -> None:
        self.full = True
        state = self._state
        message = f"{OVER_LIMIT} ({what}): the job's subject holds junk or too many re-runs"
        if state is not None and not state.finished:
            result = Result("error", "", state.claims, checked.ts or 0, message=message)
            self._state = replace(state, state="finished", result=result, lease=None)
        self._history.append(HistoryEntry(checked.seq, "?", "", 0, False, message))

    def log_rejections(self) -> None:
        """One warning for every message rejected since the last call (not one each)."""
        if not self._rejections:
            return
        total = sum(self._rejections.values())
        kinds = ", ".join(f"{name}: {n}" for name, n in self._rejections.most_common())
        logger.warning("ignored %d message(s) on %s: %s", total, self.subject, kinds)
        self._rejections.clear()

    def state(self) -> JobState | None:
        """The job's state after the events added so far (None when nothing valid yet)."""
        if self._state is None:
            return None
        if self._cached is None:
            self._cached = _hand_on(
                replace(
                    self._state,
                    last_seq=self._last_seq,
                    history=tuple(self._history),
                    rejected=self._rejected,
                    events=self._count,
                    history_bytes=self._bytes,
                ),
                self.policy.current if self.policy else None,
                now_ms(),
            )
        return self._cached

    def needs_server_time(self, own: CheckedEvent) -> bool:
        """Whether our own event ``own``, appended on the last message we know, is judged by
        server time (so its outcome is known only once read back with its timestamp)."""
        state = self._state
        if state is None or own.opened is None:
            return False
        kind = own.opened.event.get("type")
        if kind == "renewed":
            return True
        if state.lease is not None and state.lease.challenge is not None:
            return True
        return kind == "cancel" and state.cancel_requested
