"""Every name on the wire: streams, subjects, consumers, buckets, keys and headers.

Nobody else builds a subject. Queue names and job ids are validated here, so anything that
reaches a subject is a single, safe NATS token.
"""

from __future__ import annotations

import re
from typing import Literal

from asman.errors import InvalidInput, InvalidQueueName

__all__ = [
    "BLOBS_BUCKET",
    "HDR_EXPECTED_LAST_SUBJECT_SEQ",
    "HDR_MSG_ID",
    "HDR_TTL",
    "JOBS_STREAM",
    "LOGS_STREAM",
    "META_WIRE",
    "V1_PENDING_STREAM",
    "WAITING_STREAM",
    "WORKERS_STREAM",
    "JobClass",
    "is_policy_subject",
    "job_id_from_subject",
    "job_subject",
    "jobs_filter",
    "logs_subject",
    "policy_subject",
    "validate_job_id",
    "validate_peer_id",
    "validate_proc",
    "validate_queue",
    "waiting_filter",
    "waiting_key",
    "waiting_subject",
    "worker_subject",
    "workers_filter",
]

PREFIX = "asman"
JOBS_STREAM = "ASMAN_JOBS"
WAITING_STREAM = "ASMAN_WAITING"
#: the work-queue stream of wire v1 (Asman 0.1), which ``asman migrate`` removes
V1_PENDING_STREAM = "ASMAN_PENDING"
LOGS_STREAM = "ASMAN_LOGS"
WORKERS_STREAM = "ASMAN_WORKERS"
BLOBS_BUCKET = "ASMAN_BLOBS"

HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_MSG_ID = "Nats-Msg-Id"
HDR_TTL = "Nats-TTL"

#: stream metadata keys: the wire version, and the protocol's numbers (``events.Rules``)
META_WIRE = "asman_wire"
META_RULES = {
    "lease_ms": "asman_lease_ms",
    "max_attempts": "asman_max_attempts",
    "max_events": "asman_max_events",
    "max_history_bytes": "asman_max_history_bytes",
    "default_duration_ms": "asman_default_duration_ms",
    "life_allowance_ms": "asman_life_allowance_ms",
}

JobClass = Literal["cpu", "gpu"]
JOB_CLASSES: tuple[JobClass, ...] = ("cpu", "gpu")

_QUEUE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JOB_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEER_ID_RE = re.compile(r"[0-9a-f]{64}")
_PROC_RE = re.compile(r"[0-9a-f]{1,32}")


def validate_queue(queue: str) -> str:
    """Return ``queue`` if it is a valid queue name (one NATS subject token), else raise."""
    if not isinstance(queue, str) or not _QUEUE_RE.fullmatch(queue):
        raise InvalidQueueName(str(queue))
    return queue


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidInput(
            f"job id {job_id!r} is not valid: a job id is 64 lower-case hex characters "
            "(the SHA-256 of the definition, as `asman submit` prints it)"
        )
    return job_id


def validate_peer_id(peer_id: str) -> str:
    if not isinstance(peer_id, str) or not _PEER_ID_RE.fullmatch(peer_id):
        raise InvalidInput(f"peer id {peer_id!r} is not valid: 64 lower-case hex characters")
    return peer_id


def _validate_class(job_class: str) -> JobClass:
    if job_class == "cpu":
        return "cpu"
    if job_class == "gpu":
        return "gpu"
    raise InvalidInput(f"job class {job_class!r} is not valid: use 'cpu' or 'gpu'")


def job_subject(queue: str, job_id: str) -> str:
    """Subject of a job's events in ``ASMAN_JOBS``."""
    return f"{PREFIX}.job.{validate_queue(queue)}.{validate_job_id(job_id)}"


def jobs_filter(queue: str) -> str:
    """Filter matching every job subject of a queue."""
    return f"{PREFIX}.job.{validate_queue(queue)}.*"


#: the last token of a queue's policy subject (never a job id: those are 64 hex characters)
POLICY_TOKEN = "policy"


def policy_subject(queue: str) -> str:
    """Subject of a queue's policy versions in ``ASMAN_JOBS`` (asman.log.policy)."""
    return f"{PREFIX}.job.{validate_queue(queue)}.{POLICY_TOKEN}"


def is_policy_subject(subject: str) -> bool:
    parts = subject.split(".")
    return len(parts) == 4 and parts[:2] == [PREFIX, "job"] and parts[3] == POLICY_TOKEN


def job_id_from_subject(subject: str) -> tuple[str, str]:
    """(queue, job id) of a job subject; raises InvalidInput for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] != "job":
        raise InvalidInput(f"{subject!r} is not a job subject")
    return validate_queue(parts[2]), validate_job_id(parts[3])


def waiting_subject(queue: str, job_class: str, job_id: str) -> str:
    """Subject of a job's entry in the waiting index ``ASMAN_WAITING``."""
    return (
        f"{PREFIX}.waiting.{validate_queue(queue)}.{_validate_class(job_class)}."
        f"{validate_job_id(job_id)}"
    )


def waiting_filter(queue: str) -> str:
    """Filter matching every waiting-index entry of a queue (both classes)."""
    return f"{PREFIX}.waiting.{validate_queue(queue)}.*.*"


def waiting_key(subject: str) -> tuple[str, str, str] | None:
    """(queue, class, job id) of a waiting-index subject; None for anything else."""
    parts = subject.split(".")
    if len(parts) != 5 or parts[0] != PREFIX or parts[1] != "waiting":
        return None
    queue, job_class, job = parts[2], parts[3], parts[4]
    if not _QUEUE_RE.fullmatch(queue) or job_class not in JOB_CLASSES:
        return None
    if not _JOB_ID_RE.fullmatch(job):
        return None
    return queue, job_class, job


def logs_subject(queue: str, job_id: str) -> str:
    """Subject of a job's live log chunks in ``ASMAN_LOGS``."""
    return f"{PREFIX}.logs.{validate_queue(queue)}.{validate_job_id(job_id)}"


def validate_proc(proc: str) -> str:
    """A worker process's id under its key (``Log.session``): 1-32 lower-case hex."""
    if not isinstance(proc, str) or not _PROC_RE.fullmatch(proc):
        raise InvalidInput(f"process id {proc!r} is not valid: 1-32 lower-case hex characters")
    return proc


def worker_subject(queue: str, worker_id: str, proc: str) -> str:
    """Subject of a worker process's heartbeat in ``ASMAN_WORKERS``: several processes may
    share one key (``asman worker --procs``), each beats for itself."""
    return (
        f"{PREFIX}.workers.{validate_queue(queue)}.{validate_peer_id(worker_id)}."
        f"{validate_proc(proc)}"
    )


def workers_filter(queue: str) -> str:
    return f"{PREFIX}.workers.{validate_queue(queue)}.*.*"
