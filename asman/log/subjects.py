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
    "JOBS_STREAM",
    "LOGS_STREAM",
    "PENDING_STREAM",
    "WORKERS_BUCKET",
    "JobClass",
    "consumer_name",
    "job_id_from_subject",
    "job_subject",
    "jobs_filter",
    "logs_subject",
    "pending_filter",
    "pending_subject",
    "validate_job_id",
    "validate_queue",
    "worker_key",
    "workers_filter",
]

PREFIX = "asman"
JOBS_STREAM = "ASMAN_JOBS"
PENDING_STREAM = "ASMAN_PENDING"
LOGS_STREAM = "ASMAN_LOGS"
WORKERS_BUCKET = "ASMAN_WORKERS"
BLOBS_BUCKET = "ASMAN_BLOBS"

HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
HDR_MSG_ID = "Nats-Msg-Id"

JobClass = Literal["cpu", "gpu"]
JOB_CLASSES: tuple[JobClass, ...] = ("cpu", "gpu")

_QUEUE_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_JOB_ID_RE = re.compile(r"[0-9a-f]{64}")
_PEER_ID_RE = re.compile(r"[0-9a-f]{64}")


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


def _validate_peer_id(peer_id: str) -> str:
    if not _PEER_ID_RE.fullmatch(peer_id):
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


def job_id_from_subject(subject: str) -> tuple[str, str]:
    """(queue, job id) of a job subject; raises InvalidInput for anything else."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] != PREFIX or parts[1] != "job":
        raise InvalidInput(f"{subject!r} is not a job subject")
    return validate_queue(parts[2]), validate_job_id(parts[3])


def pending_subject(queue: str, job_class: str, job_id: str) -> str:
    """Subject of a job's dispatch ticket in ``ASMAN_PENDING``."""
    return (
        f"{PREFIX}.pending.{validate_queue(queue)}.{_validate_class(job_class)}."
        f"{validate_job_id(job_id)}"
    )


def pending_filter(queue: str, job_class: str) -> str:
    return f"{PREFIX}.pending.{validate_queue(queue)}.{_validate_class(job_class)}.*"


def consumer_name(queue: str, job_class: str) -> str:
    """Durable pull consumer shared by every worker of (queue, class)."""
    return f"asman_{validate_queue(queue)}_{_validate_class(job_class)}"


def logs_subject(queue: str, job_id: str) -> str:
    """Subject of a job's live log chunks in ``ASMAN_LOGS``."""
    return f"{PREFIX}.logs.{validate_queue(queue)}.{validate_job_id(job_id)}"


def worker_key(queue: str, worker_id: str) -> str:
    """Key of a worker's heartbeat in the ``ASMAN_WORKERS`` bucket."""
    return f"{validate_queue(queue)}.{_validate_peer_id(worker_id)}"


def workers_filter(queue: str) -> str:
    return f"{validate_queue(queue)}.*"
