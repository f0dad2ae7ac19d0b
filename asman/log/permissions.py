"""Subject permissions that confine a NATS connection to some Asman queues, and the
credential with which a connection names its queues.

Two users of the permissions:

* ``deploy/nats/accounts/permissions.py`` writes them into a server config, one user per role
  and queue (``permissions(role, queue)``);
* the auth callout (``asman.log.callout``, ``deploy/nats/public``) issues them to any
  connection that names its queues: a queue's name is the capability to submit to it and to
  work for it, so it grants both roles of every queue named (``queue_permissions``).

A user so confined runs Asman in the confined mode (``LogConfig(reads="consumer",
inbox_prefix=…, manage_streams=False)``): every read names its queue in the request *subject*,
where these permissions can check it (``asman.log.filtered``). Everything not listed is
denied: listing streams, consumers or subjects, reading another queue, the payload-filtered
direct get, wildcard subscriptions across queues, and other connections' inboxes.

The credential (``Capability``): user ``asman``, password ``<secret> <queue> <queue>…``.
The connection's inbox is ``_INBOX.<sha256(secret)[:32]>``: reply subjects show the inbox to
whoever shares a queue with the connection (a JetStream publish carries it), so the inbox is
derived from a secret that never appears in a subject, and knowing an inbox does not let
anyone present it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from asman.errors import InvalidInput
from asman.log import subjects

__all__ = [
    "CAPABILITY_USER",
    "MAX_QUEUES",
    "ROLES",
    "Capability",
    "Permissions",
    "permissions",
    "queue_permissions",
    "read_capability",
]

ROLES = ("worker", "client")
#: the user name a connection gives when it names its queues instead of logging in
CAPABILITY_USER = "asman"
#: queues one connection may name (a worker serving more runs more processes)
MAX_QUEUES = 256
_SECRET_RE = re.compile(r"[A-Za-z0-9]{32,64}")


@dataclass(frozen=True, slots=True)
class Permissions:
    user: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    @property
    def inbox_prefix(self) -> str:
        return f"_INBOX.{self.user}"


def _api(domain: str | None) -> str:
    return f"$JS.{domain}.API" if domain else "$JS.API"


def _filtered_reads(api: str, stream: str, subject_filter: str) -> list[str]:
    """Create (the filter is in the subject, so it is checked), pull and delete an ephemeral
    read consumer (asman/log/filtered.py). Its random name is the only thing unconfined."""
    return [
        f"{api}.CONSUMER.CREATE.{stream}.*.{subject_filter}",
        f"{api}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{api}.CONSUMER.DELETE.{stream}.*",
    ]


def permissions(
    role: str, queue: str, user: str | None = None, domain: str | None = None
) -> Permissions:
    """The permissions of ``role`` ("worker" or "client") on ``queue``; ``user`` names the
    inbox (``_INBOX.<user>.>``)."""
    subjects.validate_queue(queue)
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    user = user or f"{role}-{queue}"
    api = _api(domain)
    jobs = subjects.jobs_filter(queue)  # asman.job.<queue>.*
    waiting = subjects.waiting_filter(queue)  # asman.waiting.<queue>.*.*
    logs = f"{subjects.PREFIX}.logs.{queue}.*"
    beats = subjects.workers_filter(queue)  # asman.workers.<queue>.*.*
    pub = [
        jobs,  # signed events (JetStream publish; the PubAck comes back to the inbox)
        waiting,  # waiting-index entries (submit, claim, finish, repair)
        f"{api}.DIRECT.GET.{subjects.JOBS_STREAM}.{jobs}",  # last event of a job: subject form
        *_filtered_reads(api, subjects.JOBS_STREAM, jobs),
        *_filtered_reads(api, subjects.WAITING_STREAM, waiting),
        *_filtered_reads(api, subjects.LOGS_STREAM, logs),
        *_filtered_reads(api, subjects.WORKERS_STREAM, beats),
    ]
    sub = [f"_INBOX.{user}.>", jobs]  # own replies; live job events (watch, cancel)
    if role == "worker":
        pub += [logs, beats]  # live log chunks, heartbeats
        sub.append(waiting)  # live waiting-index entries: no consumer per queue
    else:
        sub.append(logs)  # follow live logs
    return Permissions(user, tuple(pub), tuple(sub))


def queue_permissions(queues: Iterable[str], inbox: str, domain: str | None = None) -> Permissions:
    """Worker and client of every queue of ``queues``, replies on ``_INBOX.<inbox>.>``: what
    the auth callout grants a connection that names those queues."""
    pub: dict[str, None] = {}
    sub: dict[str, None] = {f"_INBOX.{inbox}.>": None}
    for queue in queues:
        for role in ROLES:
            p = permissions(role, queue, inbox, domain)
            pub.update(dict.fromkeys(p.publish))
            sub.update(dict.fromkeys(p.subscribe))
    return Permissions(inbox, tuple(pub), tuple(sub))


@dataclass(frozen=True, slots=True)
class Capability:
    """What a connection presents to be admitted for ``queues``: ``secret`` yields its
    inbox, which only the holder of the secret can present again."""

    queues: tuple[str, ...]
    secret: str

    @classmethod
    def new(cls, queues: Iterable[str]) -> Capability:
        return cls(_checked_queues(queues), secrets.token_hex(16))

    @property
    def inbox(self) -> str:
        return hashlib.sha256(self.secret.encode()).hexdigest()[:32]

    @property
    def inbox_prefix(self) -> str:
        return f"_INBOX.{self.inbox}"

    @property
    def user(self) -> str:
        return CAPABILITY_USER

    @property
    def password(self) -> str:
        return " ".join((self.secret, *self.queues))

    def permissions(self, domain: str | None = None) -> Permissions:
        return queue_permissions(self.queues, self.inbox, domain)


def read_capability(user: str | None, password: str | None) -> Capability:
    """The capability a connection presented (its CONNECT's user and password); raises
    ``InvalidInput`` saying what is wrong with it."""
    if user != CAPABILITY_USER:
        raise InvalidInput(
            f"{_named(user)} is not {CAPABILITY_USER!r}: a connection names its queues as "
            f"user {CAPABILITY_USER!r}, password '<secret> <queue>…'"
        )
    secret, *queues = (password or "").split(" ")
    if not _SECRET_RE.fullmatch(secret):
        raise InvalidInput("the password does not start with a secret of 32-64 letters/digits")
    return Capability(_checked_queues(queues), secret)


def _checked_queues(queues: Iterable[str]) -> tuple[str, ...]:
    named = tuple(dict.fromkeys(queues))
    if not named:
        raise InvalidInput("no queue named: a connection is admitted for the queues it names")
    if len(named) > MAX_QUEUES:
        raise InvalidInput(
            f"{len(named)} queues named: a connection may name at most {MAX_QUEUES}; run "
            "more workers, each for fewer queues"
        )
    for queue in named:
        subjects.validate_queue(queue)
    return named


def _named(user: str | None) -> str:
    return "no user" if user is None else f"user {user!r}"
