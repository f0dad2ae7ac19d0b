"""Every error Asman raises, under one root.

Each error says what failed and what to do next, and carries its fields (queue, job id,
subject, field name) so callers can act on them without parsing text.

    AsmanError
    ├── InvalidInput                  bad input from a user, a file or the network (exit 2)
    │   ├── InvalidDefinition         a job definition field is wrong (.field)
    │   ├── InvalidQueueName          not a NATS subject token (.queue)
    │   ├── InvalidPath               a file name escapes its folder or is not allowed (.path)
    │   ├── UrlRefused                a job's URL or image registry is on a non-public address
    │   │                             the worker may not reach (.host, .address)
    │   └── ConfigError               a flag, variable or config file value is wrong
    ├── EnvelopeError                 a message on the log was rejected (.subject)
    │   ├── MalformedEnvelope         not a COSE_Sign1 envelope of ours, or truncated
    │   ├── EnvelopeTooLarge          over the size limit
    │   ├── BadSignature              the signature does not verify for the claimed key
    │   ├── WrongSubject              signed for another subject (a replay onto another job/queue)
    │   └── UnauthorizedSigner        valid signature, but this key may not write this event
    ├── KeyFileError                  a peer key file is missing, unreadable or too open (.path)
    ├── LogError                      the shared log (NATS JetStream) failed (exit 3)
    │   ├── LogUnavailable            cannot reach NATS or JetStream in time
    │   ├── NotAdmitted               the NATS server refused this connection (.queues)
    │   ├── JobNotFound               no such job on this queue (.queue, .job_id)
    │   ├── Conflict                  a compare-and-set lost: someone else wrote first
    │   ├── LeaseLost                 this worker no longer holds the job's lease
    │   ├── HistoryFull               a job's subject holds all the messages it may
    │   ├── MessageTooLarge           an event is over the stream's message size limit
    │   └── WireVersionMismatch       the log was written by another Asman wire version
    ├── BlobError                     the blob store failed (.key)
    │   ├── BlobNotFound
    │   ├── BlobCorrupt               bytes do not match their sha256
    │   ├── BlobTooLarge              over a size limit
    │   ├── BlobUnavailable           the store did not answer (transient: try again)
    │   └── BlobFull                  the store's size limit is reached
    └── RuntimeFailure                the container runtime failed (pull, build, run) (exit 4)
        ├── ImageError                pull or build failed (.log holds the tail of the output)
        └── DockerUnavailable         no Docker engine reachable
"""

from __future__ import annotations

__all__ = [
    "AsmanError",
    "BadSignature",
    "BlobCorrupt",
    "BlobError",
    "BlobFull",
    "BlobNotFound",
    "BlobTooLarge",
    "BlobUnavailable",
    "ConfigError",
    "Conflict",
    "DockerUnavailable",
    "EnvelopeError",
    "EnvelopeTooLarge",
    "HistoryFull",
    "ImageError",
    "InvalidDefinition",
    "InvalidInput",
    "InvalidPath",
    "InvalidQueueName",
    "JobNotFound",
    "KeyFileError",
    "LeaseLost",
    "LogError",
    "LogUnavailable",
    "MalformedEnvelope",
    "MessageTooLarge",
    "NotAdmitted",
    "RuntimeFailure",
    "UnauthorizedSigner",
    "UrlRefused",
    "WireVersionMismatch",
    "WrongSubject",
]


class AsmanError(Exception):
    """Root of every Asman error. ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class InvalidInput(AsmanError):
    exit_code = 2


class InvalidDefinition(InvalidInput):
    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"definition field '{field}': {message}" if field else message)


class InvalidQueueName(InvalidInput):
    def __init__(self, queue: str) -> None:
        self.queue = queue
        super().__init__(
            f"queue name {queue!r} is not valid: use 1-64 letters, digits, '-' or '_' "
            "(make an unguessable one with `asman queue new`)"
        )


class InvalidPath(InvalidInput):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"file name {path!r}: {message}")


class UrlRefused(InvalidInput):
    """Refused before any request was sent: the destination is this machine or a private
    network (server-side request forgery), or the URL cannot be checked."""

    def __init__(self, message: str, host: str = "", address: str = "") -> None:
        self.host = host
        self.address = address
        super().__init__(message)


class ConfigError(InvalidInput):
    pass


class EnvelopeError(AsmanError):
    def __init__(self, message: str, subject: str = "") -> None:
        self.subject = subject
        super().__init__(f"{message} (subject {subject})" if subject else message)


class MalformedEnvelope(EnvelopeError):
    pass


class EnvelopeTooLarge(EnvelopeError):
    pass


class BadSignature(EnvelopeError):
    pass


class WrongSubject(EnvelopeError):
    pass


class UnauthorizedSigner(EnvelopeError):
    pass


class KeyFileError(AsmanError):
    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"key file {path}: {message}")


class LogError(AsmanError):
    exit_code = 3


class LogUnavailable(LogError):
    pass


class NotAdmitted(LogError):
    """The NATS server refused the connection: its credentials, or the queues it named
    (``queues``, empty when it named none)."""

    def __init__(self, message: str, queues: tuple[str, ...] = ()) -> None:
        self.queues = queues
        super().__init__(message)


class JobNotFound(LogError):
    def __init__(self, queue: str, job_id: str) -> None:
        self.queue = queue
        self.job_id = job_id
        super().__init__(
            f"job {job_id} not found on queue {queue!r}: check the queue name and the id "
            "(`asman jobs ls QUEUE` lists the queue's jobs)"
        )


class Conflict(LogError):
    pass


class LeaseLost(LogError):
    def __init__(self, queue: str, job_id: str, message: str = "") -> None:
        self.queue = queue
        self.job_id = job_id
        super().__init__(message or f"lease on job {job_id} (queue {queue!r}) was lost")


class HistoryFull(LogError):
    pass


class MessageTooLarge(LogError):
    pass


class WireVersionMismatch(LogError):
    pass


class BlobError(AsmanError):
    def __init__(self, message: str, key: str = "") -> None:
        self.key = key
        super().__init__(message)


class BlobNotFound(BlobError):
    pass


class BlobCorrupt(BlobError):
    pass


class BlobTooLarge(BlobError):
    pass


class BlobUnavailable(BlobError):
    pass


class BlobFull(BlobError):
    """The store refused new bytes: its size limit is reached."""


class RuntimeFailure(AsmanError):
    exit_code = 4


class ImageError(RuntimeFailure):
    def __init__(self, message: str, log: str = "") -> None:
        self.log = log
        super().__init__(message)


class DockerUnavailable(RuntimeFailure):
    pass
