"""Queue policies: who may submit to a queue, whose claims and results count, who administers it.

A queue without a policy is open, as in compute-queues: whoever knows its name may submit and
work. A policy is a chain of signed, versioned events on the queue's own subject
``asman.job.<queue>.policy`` in ``ASMAN_JOBS`` (each appended by compare-and-set, chained by
``prev`` like a job's events; kept past the stream's retention with ``Nats-TTL: never``).

**Who may write one.** Only queues whose name is *owner-bound* can carry a policy::

    <26 random base32 characters>-<26 characters of SHA-256("asman queue owner", random, owner key)>

(``asman queue new --private`` makes one). The first version counts only when signed by the key
the name is bound to; later versions only when signed by an admin of the version before (the
owner always is one). On any other name every policy message is ignored: a stranger who learns
an open queue's name cannot take it over by writing a policy first.

**What it says.** Who may submit (anyone, or keys); whose claims and results count (anyone,
listed worker keys, or workers certified by an institution's key); admin keys (cancel and
re-run anything, change the policy); ceilings on what jobs may ask (duration, memory, CPUs, GPUs,
image patterns) and whether their containers may have a network; the lease TTL and the
retention of the queue's jobs.

**How the fold uses it** (``asman.log.events``). Each job event is judged under the policy in
force at the event's server time (a policy governs what is written after it): a ``submitted``
from a key that may not submit, or over a ceiling, does not create the job; a claim by an
untrusted key is ignored, so the job stays queued for trusted workers; the holder's events
count only while it is trusted, and a holder no longer trusted by the latest policy loses its
lease (its job goes back to the queue). Results written while a worker was trusted stay.

A worker certificate is an envelope signed by a certifier key on the subject ``asman.cert``:
``{"type": "cert", "worker": <key>, "until": <ms>, "queue": <name or absent>}``; the worker
carries it in its claims (``asman worker --cert FILE``; ``asman key certify`` makes one).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fnmatch
import hashlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from asman.errors import EnvelopeError, InvalidInput
from asman.log import subjects, wire
from asman.log.keys import PeerKey

__all__ = [
    "CERT_SUBJECT",
    "Ceilings",
    "Policy",
    "PolicyBook",
    "PolicyChain",
    "PolicyView",
    "check_cert",
    "is_owner_bound",
    "make_cert",
    "new_private_queue",
    "owner_matches",
]

logger = logging.getLogger(__name__)

CERT_SUBJECT = "asman.cert"
MAX_KEYS = 1024
MAX_PATTERNS = 64
MAX_PATTERN_LEN = 256
#: policy versions one queue may have (the subject's message limit is the jobs stream's)
MAX_VERSIONS = 256

_B32 = "[a-z2-7]"
_OWNED_RE = re.compile(rf"({_B32}{{26}})-({_B32}{{26}})")
_HEX = re.compile(r"[0-9a-f]{64}")


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def _fingerprint(random_part: str, owner: str) -> str:
    digest = hashlib.sha256(
        b"asman queue owner\0" + random_part.encode() + b"\0" + bytes.fromhex(owner)
    ).digest()
    return _b32(digest)[:26]


def new_private_queue(owner: str) -> str:
    """A new unguessable queue name bound to the key ``owner`` (a peer id)."""
    subjects.validate_peer_id(owner)
    random_part = _b32(secrets.token_bytes(16))[:26]
    return f"{random_part}-{_fingerprint(random_part, owner)}"


def is_owner_bound(queue: str) -> bool:
    """Whether ``queue`` may carry a policy (its name is bound to an owner key)."""
    return bool(_OWNED_RE.fullmatch(queue))


def owner_matches(queue: str, key: str) -> bool:
    """Whether ``queue``'s name is bound to the key ``key``."""
    m = _OWNED_RE.fullmatch(queue)
    if m is None or not isinstance(key, str) or not _HEX.fullmatch(key):
        return False
    return secrets.compare_digest(_fingerprint(m.group(1), key), m.group(2))


# -- the policy --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ceilings:
    """The most a job on the queue may ask for (None: no ceiling)."""

    max_duration_ms: int | None = None
    max_memory: int | None = None
    max_millicpus: int | None = None
    max_gpus: int | None = None
    #: image name patterns (fnmatch) a job's ``image`` must match; None: any image, and
    #: builds. With patterns, builds are refused (a Dockerfile can start from anything).
    images: tuple[str, ...] | None = None
    #: whether the queue's containers may have a network (a worker started with
    #: ``--network bridge`` runs this queue's jobs with none when False)
    network: bool = True

    @property
    def unbounded(self) -> bool:
        return (
            self.images is None
            and self.max_duration_ms is None
            and self.max_memory is None
            and self.max_millicpus is None
            and self.max_gpus is None
        )

    def refusal(self, definition: Mapping[str, Any]) -> str:
        """An empty string when ``definition`` is within the ceilings, else why not (one
        line). The fold asks for every job it reads: without ceilings, nothing is parsed."""
        if self.unbounded:
            return ""
        from asman.log.definition import JobSpec

        try:
            spec = JobSpec.from_definition(definition)
        except InvalidInput:
            return ""  # an invalid definition is the worker's to end with its reason
        if self.images is not None:
            if spec.image is None:
                return "this queue's policy allows only listed images, not builds"
            if not any(fnmatch.fnmatchcase(spec.image, p) for p in self.images):
                return (
                    f"image {spec.image!r} is not allowed by this queue's policy "
                    f"(allowed: {', '.join(self.images)})"
                )
        limit = self.max_duration_ms
        if limit is not None and (spec.max_duration_ms is None or spec.max_duration_ms > limit):
            return f"maxDuration must be set and at most {limit // 1000} s on this queue"
        if self.max_memory is not None and (spec.memory or 0) > self.max_memory:
            return f"requirements.memory is over this queue's ceiling of {self.max_memory} bytes"
        cpus = self.max_millicpus
        if cpus is not None and spec.cpus is not None and spec.cpus * 1000 > cpus:
            return f"requirements.cpus is over this queue's ceiling of {cpus / 1000:g}"
        if self.max_gpus is not None and spec.gpus > self.max_gpus:
            return f"requirements.gpus is over this queue's ceiling of {self.max_gpus}"
        return ""


@dataclass(frozen=True, slots=True)
class Policy:
    """One version of a queue's policy, as verified from the log."""

    queue: str
    version: int
    owner: str
    signer: str
    admins: frozenset[str] = frozenset()
    #: None: anyone may submit
    submitters: frozenset[str] | None = None
    #: None: anyone's claims and results count
    workers: frozenset[str] | None = None
    certifiers: frozenset[str] = frozenset()
    ceilings: Ceilings = field(default_factory=Ceilings)
    lease_ms: int | None = None
    retention_ms: int | None = None
    #: server time of the message (None: known only first-hand)
    ts: int | None = None
    seq: int = 0

    @classmethod
    def private(cls, queue: str, owner: str) -> Policy:
        """The first policy of a private queue: only its owner submits and works."""
        only = frozenset({owner})
        return cls(queue, 0, owner, owner, submitters=only, workers=only)

    def is_admin(self, key: str) -> bool:
        return key == self.owner or key in self.admins

    def may_submit(self, key: str) -> bool:
        return self.submitters is None or key in self.submitters or self.is_admin(key)

    def lists_worker(self, key: str) -> bool:
        return self.workers is None or key in self.workers

    def accepts(self, cert: Cert, worker: str, queue: str, at_ms: int) -> bool:
        """Whether the verified certificate ``cert`` makes ``worker`` one of the workers this
        policy trusts on ``queue`` at ``at_ms``: signed by one of its certifiers, for that
        worker, for this queue or any, not yet ended."""
        return (
            cert.certifier in self.certifiers
            and cert.worker == worker
            and cert.queue in (None, queue)
            and cert.until_ms > at_ms
        )

    @property
    def open_to_workers(self) -> bool:
        return self.workers is None and not self.certifiers

    def to_event(self) -> dict[str, Any]:
        """The event body that writes this policy (``version``, ``prev`` and ``ts`` are the
        writer's to fill)."""
        c = self.ceilings
        return {
            "type": "policy",
            "version": self.version,
            "admins": sorted(self.admins),
            "submit": None if self.submitters is None else sorted(self.submitters),
            "workers": None if self.workers is None else sorted(self.workers),
            "certifiers": sorted(self.certifiers),
            "max_duration_ms": c.max_duration_ms,
            "max_memory": c.max_memory,
            "max_millicpus": c.max_millicpus,
            "max_gpus": c.max_gpus,
            "images": None if c.images is None else list(c.images),
            "network": c.network,
            "lease_ms": self.lease_ms,
            "retention_ms": self.retention_ms,
        }

    def to_json(self) -> dict[str, Any]:
        """The policy as the gateway and ``asman queue policy show --json`` give it."""
        c = self.ceilings
        return {
            "queue": self.queue,
            "version": self.version,
            "owner": self.owner,
            "signedBy": self.signer,
            "admins": sorted(self.admins | {self.owner}),
            "submit": "anyone" if self.submitters is None else sorted(self.submitters),
            "workers": "anyone" if self.workers is None else sorted(self.workers),
            "certifiers": sorted(self.certifiers),
            "ceilings": {
                "maxDurationMs": c.max_duration_ms,
                "memory": c.max_memory,
                "cpus": None if c.max_millicpus is None else c.max_millicpus / 1000,
                "gpus": c.max_gpus,
                "images": None if c.images is None else list(c.images),
                "network": c.network,
            },
            "leaseMs": self.lease_ms,
            "retentionMs": self.retention_ms,
            "writtenMs": self.ts,
        }

    @classmethod
    def from_event(cls, queue: str, owner: str, signer: str, body: Mapping[str, Any]) -> Policy:
        """Parse a policy event's body; ``ValueError`` saying what is wrong."""
        if body.get("type") != "policy":
            raise ValueError("not a policy event")
        version = _opt_int(body, "version", lo=1)
        if version is None:
            raise ValueError("version is missing")
        return cls(
            queue=queue,
            version=version,
            owner=owner,
            signer=signer,
            admins=frozenset(_keys(body.get("admins"), "admins") or ()),
            submitters=_keys(body.get("submit"), "submit"),
            workers=_keys(body.get("workers"), "workers"),
            certifiers=frozenset(_keys(body.get("certifiers"), "certifiers") or ()),
            ceilings=Ceilings(
                max_duration_ms=_opt_int(body, "max_duration_ms", lo=1),
                max_memory=_opt_int(body, "max_memory", lo=1),
                max_millicpus=_opt_int(body, "max_millicpus", lo=1),
                max_gpus=_opt_int(body, "max_gpus", lo=0),
                images=_patterns(body.get("images")),
                network=_bool(body.get("network", True), "network"),
            ),
            lease_ms=_opt_int(body, "lease_ms", lo=500, hi=24 * 3600 * 1000),
            retention_ms=_opt_int(body, "retention_ms", lo=60_000),
        )


def _opt_int(body: Mapping[str, Any], key: str, lo: int = 0, hi: int = 2**62) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{key} must be a whole number from {lo} to {hi}")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false")
    return value


def _keys(value: Any, key: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_KEYS:
        raise ValueError(f"{key} must be a list of at most {MAX_KEYS} keys")
    for item in value:
        if not isinstance(item, str) or not _HEX.fullmatch(item):
            raise ValueError(f"{key} must hold keys (64 lower-case hex characters)")
    return frozenset(value)


def _patterns(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_PATTERNS:
        raise ValueError(f"images must be a list of at most {MAX_PATTERNS} patterns")
    for item in value:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_PATTERN_LEN:
            raise ValueError(f"each image pattern must be 1 to {MAX_PATTERN_LEN} characters")
    return tuple(value)


# -- certificates ------------------------------------------------------------------------


def make_cert(key: PeerKey, worker: str, until_ms: int, queue: str | None = None) -> bytes:
    """A certificate, signed by ``key`` (an institution's), that ``worker`` is one of its
    workers until ``until_ms`` (for ``queue`` only, when given)."""
    subjects.validate_peer_id(worker)
    event: dict[str, Any] = {"type": "cert", "worker": worker, "until": until_ms}
    if queue is not None:
        event["queue"] = subjects.validate_queue(queue)
    return wire.seal(key, CERT_SUBJECT, event)


@dataclass(frozen=True, slots=True)
class Cert:
    certifier: str
    worker: str
    until_ms: int
    queue: str | None


def check_cert(data: Any) -> Cert:
    """Verify a certificate; ``ValueError`` saying why it is not one."""
    if not isinstance(data, bytes):
        raise ValueError("a certificate must be bytes")
    try:
        opened = wire.open_envelope(data, CERT_SUBJECT, max_size=4096)
    except EnvelopeError as exc:
        raise ValueError(f"certificate: {exc}") from exc
    body = opened.event
    worker, until, queue = body.get("worker"), body.get("until"), body.get("queue")
    if body.get("type") != "cert" or not isinstance(worker, str) or type(until) is not int:
        raise ValueError("certificate: not a worker certificate")
    if queue is not None and not isinstance(queue, str):
        raise ValueError("certificate: queue must be text")
    return Cert(opened.signer, worker, until, queue)


# -- the chain ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyView:
    """The verified versions of a queue's policy, oldest first: what a fold judges by."""

    queue: str
    versions: tuple[Policy, ...] = ()

    @property
    def current(self) -> Policy | None:
        return self.versions[-1] if self.versions else None

    @property
    def version(self) -> int:
        return len(self.versions)

    def at(self, ts: int | None) -> Policy | None:
        """The policy in force at server time ``ts`` (None: the latest known)."""
        if ts is None:
            return self.current
        found = None
        for p in self.versions:
            if p.ts is None or p.ts <= ts:
                found = p
            else:
                break
        return found


class PolicyChain:
    """Folds a policy subject's messages, oldest first, into its verified versions."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.subject = subjects.policy_subject(queue)
        self.owned = is_owner_bound(queue)
        self.versions: list[Policy] = []
        self.last_seq = 0

    def view(self) -> PolicyView:
        return PolicyView(self.queue, tuple(self.versions))

    async def catch_up(self, read: Callable[[str, int], Awaitable[list[Any]]]) -> None:
        """Add what ``read(subject, from_seq)`` returns past the last message added; each
        message ignored is logged with the reason."""
        for raw in await read(self.subject, self.last_seq + 1):
            why = self.add(raw.seq, raw.data, raw.ts)
            if why:
                logger.warning("queue %s: policy message %d ignored: %s", self.queue, raw.seq, why)

    def add(self, seq: int, data: bytes, ts: int | None) -> str:
        """Apply the next message; "" when it is a new version, else why it is ignored."""
        prev, self.last_seq = self.last_seq, seq
        return self._check(prev, seq, data, ts)

    def _check(self, prev: int, seq: int, data: bytes, ts: int | None) -> str:
        if not self.owned:
            return "this queue's name is not bound to an owner: it cannot carry a policy"
        if len(self.versions) >= MAX_VERSIONS:
            return f"more than {MAX_VERSIONS} versions"
        try:
            opened = wire.open_envelope(data, self.subject, max_size=64 * 1024)
        except EnvelopeError as exc:
            return str(exc)
        body = opened.event
        if body.get("v") != wire.SCHEMA_VERSION:
            return "another wire version"
        if body.get("prev") != prev:
            return "out of chain"
        current = self.versions[-1] if self.versions else None
        if current is None:
            if not owner_matches(self.queue, opened.signer):
                return "the first version must be signed by the key the queue name is bound to"
            owner = opened.signer
        else:
            if not current.is_admin(opened.signer):
                return f"{opened.signer[:12]} is not an admin of this queue"
            owner = current.owner
        try:
            policy = Policy.from_event(self.queue, owner, opened.signer, body)
        except (ValueError, TypeError) as exc:
            return str(exc)
        expected = (current.version + 1) if current else 1
        if policy.version != expected:
            return f"version {policy.version}, expected {expected}"
        self.versions.append(replace(policy, ts=ts, seq=seq))
        return ""


class PolicyBook:
    """The policies of the queues a peer works with, kept current.

    Open queues (names not bound to an owner) cost nothing: they are never read. An
    owner-bound queue's policy subject is read once and then again only after a message was
    published on it (a core subscription sets its ``dirty`` event) or a reconnect. At most
    ``MAX_WATCHED`` queues are followed so; past that (a gateway serving many private queues),
    a policy is read at each use.
    """

    MAX_WATCHED = 4096

    def __init__(
        self,
        read: Callable[[str, int], Awaitable[list[Any]]],
        watch: Callable[[str, asyncio.Event], Awaitable[Callable[[], Awaitable[None]]]] | None,
    ) -> None:
        self._read = read
        self._watch = watch
        self._chains: dict[str, PolicyChain] = {}
        self._dirty: dict[str, asyncio.Event] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._stops: list[Callable[[], Awaitable[None]]] = []

    def known(self, queue: str) -> PolicyView | None:
        """The view as last read (None: never read, or an open queue)."""
        chain = self._chains.get(queue)
        return chain.view() if chain is not None else None

    async def get(self, queue: str) -> PolicyView | None:
        """The queue's policy versions (None for a queue that cannot carry one)."""
        if not is_owner_bound(queue):
            return None
        if queue not in self._chains and (
            self._watch is None or len(self._chains) >= self.MAX_WATCHED
        ):
            once = PolicyChain(queue)
            await once.catch_up(self._read)
            return once.view()
        lock = self._locks.setdefault(queue, asyncio.Lock())
        async with lock:
            chain = self._chains.get(queue)
            if chain is None:
                assert self._watch is not None
                dirty = asyncio.Event()
                dirty.set()
                chain = PolicyChain(queue)
                self._stops.append(await self._watch(chain.subject, dirty))
                self._chains[queue], self._dirty[queue] = chain, dirty
            dirty = self._dirty[queue]
            if dirty.is_set():
                dirty.clear()  # a message from now on sets it again
                try:
                    await chain.catch_up(self._read)
                except BaseException:
                    dirty.set()  # read again next time
                    raise
            return chain.view()

    def invalidate(self) -> None:
        """Read every policy again at the next ``get`` (after a reconnect)."""
        for dirty in self._dirty.values():
            dirty.set()

    async def close(self) -> None:
        stops, self._stops = self._stops, []
        for stop in stops:
            with contextlib.suppress(Exception):
                await stop()


def summarize(view: PolicyView | None) -> str:
    """One line about a queue's policy, for logs and the CLI."""
    p = view.current if view else None
    if p is None:
        return "open (no policy): anyone who knows the name may submit and work"
    submit = "anyone" if p.submitters is None else f"{len(p.submitters)} key(s)"
    if p.open_to_workers:
        workers = "any worker"
    else:
        parts = []
        if p.workers is not None:
            parts.append(f"{len(p.workers)} listed worker(s)")
        if p.certifiers:
            parts.append(f"workers certified by {len(p.certifiers)} key(s)")
        workers = " or ".join(parts) or "no worker"
    return f"policy v{p.version}: submit {submit}; results from {workers}"


def keys_list(values: Iterable[str], what: str) -> list[str]:
    out = []
    for v in values:
        try:
            out.append(subjects.validate_peer_id(v))
        except InvalidInput:
            raise InvalidInput(
                f"{what} {v!r} is not a key: give a peer id (64 lower-case hex characters, "
                "as `asman keys` prints it)"
            ) from None
    return out


def worker_standing(
    view: PolicyView | None, key: str, cert: bytes | None, queue: str, now_ms: int
) -> str:
    """ "" when ``view``'s latest policy counts the claims of the worker ``key`` (with its
    certificate ``cert``), else the one line its operator needs: what to ask the owner."""
    p = view.current if view else None
    if p is None or p.lists_worker(key):
        return ""
    if cert is not None and p.certifiers:
        try:
            c = check_cert(cert)
        except ValueError as exc:
            return f"queue {queue}: the worker certificate is not valid ({exc})"
        if p.accepts(c, key, queue, now_ms):
            return ""
    return (
        f"queue {queue} trusts only its listed workers (policy v{p.version}), and this "
        f"worker's key is not one: ask the queue's owner to run "
        f"`asman queue trust {queue} {key}`"
    )
