"""The connected log: one NATS connection, its JetStream context, and Asman's streams.

``Log`` is the object every peer holds. It owns the connection, creates (and updates) the
streams and buckets of the design idempotently, and is the edge where nats errors become
``AsmanError``s: code above ``asman.log`` never sees a ``nats.*`` exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, fields, replace
from types import TracebackType
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from asman.errors import (
    AsmanError,
    ConfigError,
    Conflict,
    HistoryFull,
    LogError,
    LogUnavailable,
    MessageTooLarge,
    NotAdmitted,
    WireVersionMismatch,
)
from asman.escape import one_line
from asman.log import subjects, wire
from asman.log.events import CheckedEvent, RawEvent, Rules
from asman.log.filtered import read_filtered
from asman.log.keys import PeerKey
from asman.log.permissions import MAX_QUEUES, Capability
from asman.log.policy import PolicyBook

__all__ = ["Log", "LogConfig", "translate_errors"]

logger = logging.getLogger(__name__)

ERR_WRONG_LAST_SEQUENCE = 10071
#: the same refusal as the stream's leader words it in a cluster ("wrong last sequence")
ERR_WRONG_LAST_SEQUENCE_CONSTANT = 10164
ERR_MAX_MSGS_PER_SUBJECT = 10077
ERR_MESSAGE_TOO_LARGE = 10054
ERR_STREAM_CONFIG_CHANGED = 10058
ERR_STREAM_NOT_FOUND = 10059
READ_RETRIES = 4
#: messages per batched direct get
READ_BATCH = 256
#: a read asks for at most this many bytes per batch (a subject full of large junk must not
#: arrive in one burst)
READ_BATCH_BYTES = 1024 * 1024
#: how long a waiting-index tombstone (``d``) stays before it goes away by itself
DONE_TTL = "1s"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How to reach the log and how Asman's streams are set up.

    Every field is an option of every command (see docs/reference/environment.md).
    """

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    domain: str | None = None
    creds: str | None = None
    name: str = "asman"
    replicas: int = 1
    retention_s: int = 7 * 24 * 3600
    logs_retention_s: int = 7 * 24 * 3600
    # a challenged lease holder has this long to answer (server time); written into the
    # jobs stream's metadata by whoever creates it, and read from there by every peer
    lease_ttl_s: float = 30.0
    max_attempts: int = 3
    max_events: int = 512
    heartbeat_ttl_s: float = 30.0
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 5.0
    max_event_bytes: int = 1024 * 1024
    # create Asman's streams when they are missing
    manage_streams: bool = True
    # change existing streams to these settings (replicas, retention); off by default, so a
    # peer started with defaults never shrinks an operator's 3-replica streams
    update_streams: bool = False
    # "direct": batched direct get (fast; the subject filter is in the payload, so a reader
    # can read every queue). "consumer": filtered ephemeral consumers whose filter is in the
    # API subject, for credentials confined to some queues (asman.log.filtered,
    # deploy/nats/accounts).
    reads: str = "direct"
    # the user's own reply subjects (e.g. "_INBOX.alpha-worker"), so that a confined user may
    # subscribe to its replies only and never to anyone else's
    inbox_prefix: str | None = None
    # receive this connection's own publishes on its subscriptions; a worker turns it off
    # (it never needs its own waiting-index entries or job events back)
    echo: bool = True
    # the queues this peer uses: with no credentials given, the connection names them, and
    # on a server that requires auth (deploy/nats/public) its auth callout admits the
    # connection for exactly these queues; the peer then runs confined (reads "consumer",
    # its own inbox, no stream management)
    queues: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.queues) > MAX_QUEUES:
            raise ConfigError(
                f"{len(self.queues)} queues: one connection names at most {MAX_QUEUES}; run "
                "more workers, each for fewer queues"
            )
        for queue in self.queues:
            subjects.validate_queue(queue)
        if self.reads not in ("direct", "consumer"):
            raise ConfigError(f"reads must be 'direct' or 'consumer', not {self.reads!r}")
        if self.lease_ttl_s < 0.5:
            raise ConfigError(f"the lease ttl must be at least 0.5 s, not {self.lease_ttl_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"max attempts must be at least 1, not {self.max_attempts}")
        if not 16 <= self.max_events <= 100_000:
            raise ConfigError(f"max events must be 16 to 100000, not {self.max_events}")

    def rules(self) -> Rules:
        """The protocol's numbers this config asks for (used when it creates the streams)."""
        return Rules(
            lease_ms=int(self.lease_ttl_s * 1000),
            max_attempts=self.max_attempts,
            max_events=self.max_events,
        )


def rules_metadata(rules: Rules) -> dict[str, str]:
    """The jobs stream's metadata: the wire version and the protocol's numbers."""
    out = {subjects.META_WIRE: str(wire.SCHEMA_VERSION)}
    for name, key in subjects.META_RULES.items():
        out[key] = str(getattr(rules, name))
    return out


def rules_from_metadata(metadata: dict[str, str] | None, default: Rules) -> Rules:
    """The protocol's numbers from a jobs stream's metadata (``default`` for what is
    missing or not a positive number)."""
    values: dict[str, int] = {}
    names = {f.name for f in fields(Rules)}
    for name, key in subjects.META_RULES.items():
        raw = (metadata or {}).get(key)
        if name in names and raw is not None and raw.isdigit() and int(raw) > 0:
            values[name] = int(raw)
    return Rules(**{**{f.name: getattr(default, f.name) for f in fields(Rules)}, **values})


@functools.lru_cache(maxsize=512)
def _epoch_seconds(prefix: str) -> int:
    return int(datetime.datetime.fromisoformat(prefix + "+00:00").timestamp())


def server_ms(stamp: str | None) -> int | None:
    """Milliseconds since the epoch of a ``Nats-Time-Stamp`` (RFC 3339, UTC, nanoseconds):
    the server's time of a stored message. None if it is missing or not one."""
    if not stamp or len(stamp) < 20 or stamp[-1] != "Z":
        return None
    try:
        base = _epoch_seconds(stamp[:19])
    except ValueError:
        return None
    frac = stamp[20:-1] if stamp[19] == "." else ""
    if frac and not frac.isdigit():
        return None
    return base * 1000 + (int((frac + "000")[:3]) if frac else 0)


class _Translate:
    """Context manager and decorator body: nats errors → Asman errors."""

    def __init__(self, what: str, log: Log | None = None) -> None:
        self.what = what
        self.log = log

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, AsmanError):
            return
        if isinstance(exc, nats.js.errors.APIError):
            if exc.err_code in (ERR_WRONG_LAST_SEQUENCE, ERR_WRONG_LAST_SEQUENCE_CONSTANT):
                raise Conflict(
                    f"{self.what}: someone else wrote first ({exc.description})"
                ) from exc
            if exc.err_code == ERR_MAX_MSGS_PER_SUBJECT:
                raise HistoryFull(
                    f"{self.what}: the subject holds all the messages it may "
                    f"({exc.description}); nothing more can be written there"
                ) from exc
            if exc.err_code == ERR_MESSAGE_TOO_LARGE:
                raise MessageTooLarge(f"{self.what}: {exc.description}") from exc
            raise LogError(
                f"{self.what}: JetStream refused: {exc.description} (code {exc.err_code})"
            ) from exc
        if isinstance(exc, nats.errors.MaxPayloadError):
            raise MessageTooLarge(
                f"{self.what}: the message is over the server's max_payload"
            ) from exc
        if isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
            denied = self.log.recently_denied() if self.log is not None else None
            if denied:
                # the server drops what a user may not publish or read and says so on the
                # side: the request then only times out; say what really happened
                raise LogError(
                    f"{self.what}: the NATS server refused this user's credentials the "
                    f"permission ({one_line(denied)[:300]}): they do not allow it; see "
                    "docs/operations.md, 'Accounts and confined credentials'"
                ) from exc
            raise LogUnavailable(
                f"{self.what}: NATS did not answer in time: check that the server is up and "
                "JetStream is enabled (`asman dev` starts one)"
            ) from exc
        if isinstance(exc, nats.errors.NoRespondersError | nats.js.errors.NoStreamResponseError):
            raise LogUnavailable(
                f"{self.what}: no JetStream answered: is JetStream enabled and the domain right?"
            ) from exc
        if isinstance(exc, nats.errors.Error):
            raise LogUnavailable(f"{self.what}: NATS error: {exc}") from exc


def translate_errors(what: str, log: Log | None = None) -> _Translate:
    """``with translate_errors("reading job x", log):`` turns nats errors into
    ``AsmanError``s (a timeout after ``log``'s server refused a permission says so)."""
    return _Translate(what, log)


class Log:
    """A peer's connection to the shared log.

    Use as ``async with Log(config, key) as log:``. Not reusable after close.
    """

    def __init__(self, config: LogConfig, key: PeerKey) -> None:
        self.config = config
        self.key = key
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._closed = False
        self._reconnect_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._replies: _Replies | None = None
        self._replies_lock = asyncio.Lock()  # two first requests open one inbox, not two
        self._denied: tuple[float, str] | None = None  # the last permissions violation
        #: the protocol's numbers, from the jobs stream's metadata once connected
        self.rules: Rules = config.rules()
        #: this process's id under its key: leases and heartbeats name it, so that several
        #: processes sharing one key (``asman worker --procs``) never take each other's jobs
        #: for their own
        self.session = secrets.token_hex(8)
        #: how long a heartbeat lives: the workers stream's max age (its creator's setting)
        self.heartbeat_ttl_ms = int(config.heartbeat_ttl_s * 1000)
        #: the policies of the owner-bound queues this peer has looked at (asman.log.policy)
        self.policies = PolicyBook(self.read_policy_subject, self.wake_on)
        #: a worker certificate this peer's claims carry (``asman worker --cert``)
        self.cert: bytes | None = None
        #: admitted by the server's auth callout for ``config.queues`` only (then ``config``
        #: is the confined one: filtered reads, the capability's inbox, no stream management)
        self.confined = False
        self._refused = False  # the server answered "Authorization Violation" while connecting

    # -- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> Log:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self, *, setup: bool = True) -> None:
        """Connect; with ``setup`` (the default), create the streams (``manage_streams``) or
        read the protocol's numbers from them. ``setup=False`` only connects (an upgrade
        that must look at older streams first: ``asman.log.migrate``)."""
        if self._closed:
            raise LogError("this Log was closed; open a new one")
        if self._nc is not None:
            return
        servers = list(self.config.servers)
        options: dict[str, Any] = {
            "servers": servers,
            "name": self.config.name,
            "connect_timeout": self.config.connect_timeout_s,
            # bounded for the first connect (a wrong URL fails fast); unlimited afterwards
            "max_reconnect_attempts": 2,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "no_echo": not self.config.echo,
            "error_cb": self._on_error,
            "reconnected_cb": self._on_reconnected,
            "disconnected_cb": self._on_disconnected,
        }
        if self.config.creds:
            options["user_credentials"] = self.config.creds
        if self.config.inbox_prefix:
            options["inbox_prefix"] = self.config.inbox_prefix
        capability = self._capability()
        if capability is not None:
            # sent only to a server that requires auth (nats-py sends credentials when the
            # server's INFO says auth_required): an open server never sees them
            options["user"] = capability.user
            options["password"] = capability.password
            options["inbox_prefix"] = capability.inbox_prefix
        self._refused = False
        try:
            self._nc = await nats.connect(**options)
        except (TimeoutError, nats.errors.NoServersError, OSError) as exc:
            if self._refused:
                raise self._not_admitted(servers, capability) from exc
            raise LogUnavailable(
                f"cannot reach NATS at {_shown(servers)}: start one with `asman dev`, or "
                "pass --nats URL (env ASMAN_NATS_URL)"
            ) from exc
        except nats.errors.Error as exc:
            if self._refused or "authorization violation" in str(exc).lower():
                raise self._not_admitted(servers, capability) from exc
            raise LogUnavailable(f"cannot connect to NATS at {_shown(servers)}: {exc}") from exc
        self._nc.options["max_reconnect_attempts"] = -1
        if capability is not None and _auth_required(self._nc):
            # admitted by the server's auth callout for these queues only
            self.confined = True
            self.config = replace(
                self.config,
                reads="consumer",
                manage_streams=False,
                update_streams=False,
                inbox_prefix=capability.inbox_prefix,
            )
        self._js = self._nc.jetstream(
            domain=self.config.domain, timeout=self.config.request_timeout_s
        )
        if not setup:
            return
        try:
            if self.config.manage_streams:
                await self.ensure_streams()
            elif self.config.reads != "consumer":
                await self.load_rules()
        except BaseException:
            # a refused setup (another wire version, no permission) must not leave the
            # connection open behind the caller's back: ``async with`` never reaches __aexit__
            await self.close()
            raise
        # a confined peer (reads="consumer") may not read stream info (it could list subjects
        # with it): it folds with its configured numbers, which the operator keeps equal to
        # the deployment's (docs/operations.md, "Confined credentials")

    async def read_policy_subject(self, subject: str, start: int) -> list[RawEvent]:
        """A queue's policy messages from ``start`` (``asman.log.policy``)."""
        return await self.read_subject(subjects.JOBS_STREAM, subject, start)

    async def close(self) -> None:
        self._closed = True
        await self.policies.close()
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.drain()
            with contextlib.suppress(Exception):
                await nc.close()

    def _capability(self) -> Capability | None:
        """What this connection presents when it was given queues and no credentials."""
        if not self.config.queues or self.config.creds:
            return None
        if any(urlsplit(url).username is not None for url in self.config.servers):
            return None
        return Capability.new(self.config.queues)

    def _not_admitted(self, servers: list[str], capability: Capability | None) -> NotAdmitted:
        where = f"the NATS server at {_shown(servers)} refused this connection"
        logins = "(--nats nats://USER:PASSWORD@HOST:4222, or --creds FILE)"
        if capability is not None:
            named = ", ".join(capability.queues)
            return NotAdmitted(
                f"{where}, which named queue(s) {named}: it admits only connections that name "
                "valid queues, through its auth callout (is `asman callout` running?), or that "
                f"log in {logins}",
                capability.queues,
            )
        if self.config.creds or any(urlsplit(u).username is not None for u in servers):
            return NotAdmitted(f"{where}: it does not accept the credentials given {logins}")
        return NotAdmitted(
            f"{where}: it requires a login {logins}, or a command that names its queues"
        )

    async def _on_error(self, exc: Exception) -> None:
        text = str(exc)
        if "authorization violation" in text.lower() or isinstance(
            exc, nats.errors.AuthorizationError
        ):
            self._refused = True
        if "permissions violation" in text.lower():
            self._denied = (time.monotonic(), text.removeprefix("nats: "))
            logger.warning("NATS refused a permission: %s", one_line(text))
        else:
            logger.debug("nats: %s", exc)

    def recently_denied(self) -> str | None:
        """The server's last permissions violation on this connection, if it came within the
        last request timeout (and a little): what a timing-out request most likely hit."""
        if self._denied is None:
            return None
        at, text = self._denied
        return text if time.monotonic() - at <= self.config.request_timeout_s + 5 else None

    async def _on_disconnected(self) -> None:
        if not self._closed:
            logger.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS")
        self.policies.invalidate()  # a policy change may have been missed while away
        for cb in list(self._reconnect_callbacks):
            try:
                await cb()
            except Exception:
                logger.exception("reconnect callback failed")

    def on_reconnect(self, cb: Callable[[], Awaitable[None]]) -> Callable[[], None]:
        """Call ``cb`` after every reconnect; returns a function that unregisters it."""
        self._reconnect_callbacks.append(cb)
        return lambda: self._reconnect_callbacks.remove(cb)

    # -- raw handles, for asman.log modules only ----------------------------------------

    @property
    def nc(self) -> NATS:
        if self._nc is None:
            raise LogError("the log is not connected (use `async with Log(...)`)")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise LogError("the log is not connected (use `async with Log(...)`)")
        return self._js

    @property
    def api_prefix(self) -> str:
        return f"$JS.{self.config.domain}.API" if self.config.domain else "$JS.API"

    @property
    def peer_id(self) -> str:
        return self.key.peer_id

    # -- streams -----------------------------------------------------------------------

    def stream_configs(self) -> list[StreamConfig]:
        c = self.config
        rules = c.rules()
        return [
            StreamConfig(
                name=subjects.JOBS_STREAM,
                description="Asman job events (signed, chained envelopes), one subject per job",
                subjects=["asman.job.*.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                max_age=float(c.retention_s),
                max_msg_size=c.max_event_bytes,
                # a job's history is bounded: the server refuses a subject's next message
                max_msgs_per_subject=rules.max_events,
                discard=DiscardPolicy.NEW,
                discard_new_per_subject=True,
                allow_direct=True,
                # queue policies outlive the retention of jobs (Nats-TTL: never)
                allow_msg_ttl=True,
                duplicate_window=min(120.0, float(c.retention_s)),
                metadata=rules_metadata(rules),
            ),
            StreamConfig(
                name=subjects.WAITING_STREAM,
                description="Asman waiting index: one hint per unfinished job",
                subjects=["asman.waiting.*.*.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                max_age=float(c.retention_s),
                max_msgs_per_subject=1,
                max_msg_size=256,
                allow_direct=True,
                allow_msg_ttl=True,
                duplicate_window=min(10.0, float(c.retention_s)),
                metadata={subjects.META_WIRE: str(wire.SCHEMA_VERSION)},
            ),
            StreamConfig(
                name=subjects.WORKERS_STREAM,
                description="Asman worker heartbeats (signed), one subject per worker process",
                subjects=["asman.workers.*.*.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                max_age=float(c.heartbeat_ttl_s),
                max_msgs_per_subject=1,
                max_msg_size=64 * 1024,
                allow_direct=True,
                allow_msg_ttl=True,
                duplicate_window=min(1.0, float(c.heartbeat_ttl_s)),
            ),
            StreamConfig(
                name=subjects.LOGS_STREAM,
                description="Asman live log chunks",
                subjects=["asman.logs.*.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                num_replicas=c.replicas,
                max_age=float(c.logs_retention_s),
                max_msg_size=c.max_event_bytes,
                allow_direct=True,
                duplicate_window=min(120.0, float(c.logs_retention_s)),
            ),
        ]

    async def ensure_streams(self) -> None:
        """Create Asman's streams and buckets, or update them when settings changed; then
        take the protocol's numbers from the jobs stream (``rules``)."""
        for cfg in self.stream_configs():
            await self._ensure_stream(cfg)
        await self.load_rules()

    async def load_rules(self) -> None:
        """Read the jobs stream's wire version and protocol numbers. ``WireVersionMismatch``
        (one line, with what to do) when another Asman version made it. A peer that may not
        read stream info (confined credentials) keeps its configured numbers."""
        with translate_errors(f"reading stream {subjects.JOBS_STREAM}", self):
            try:
                info = await self.js.stream_info(subjects.JOBS_STREAM)
            except nats.js.errors.NotFoundError:
                return
        metadata = info.config.metadata or {}
        wire_version = metadata.get(subjects.META_WIRE, "1")
        if wire_version != str(wire.SCHEMA_VERSION):
            raise WireVersionMismatch(
                f"stream {subjects.JOBS_STREAM} on this NATS server holds wire format "
                f"v{wire_version}, this Asman speaks v{wire.SCHEMA_VERSION}: run `asman "
                "migrate` once to carry its unfinished jobs over (docs/operations.md, "
                "Upgrading)"
            )
        self.rules = rules_from_metadata(metadata, self.config.rules())
        with translate_errors(f"reading stream {subjects.WORKERS_STREAM}", self):
            try:
                workers = await self.js.stream_info(subjects.WORKERS_STREAM)
            except nats.js.errors.NotFoundError:
                return
        if workers.config.max_age:
            self.heartbeat_ttl_ms = int(workers.config.max_age * 1000)

    async def _ensure_stream(self, cfg: StreamConfig) -> None:
        with translate_errors(f"creating stream {cfg.name}", self):
            try:
                await self.js.add_stream(cfg)
            except nats.js.errors.APIError as exc:
                if exc.err_code != ERR_STREAM_CONFIG_CHANGED:
                    raise
                assert cfg.name is not None
                if not self.config.update_streams:
                    logger.debug("stream %s exists with other settings; left as it is", cfg.name)
                    await self._enable_msg_ttl(cfg)
                    return
                existing = await self.js.stream_info(cfg.name)
                # the protocol's numbers are the deployment's: never rewritten by a peer
                cfg.metadata = existing.config.metadata or cfg.metadata
                if cfg.name == subjects.JOBS_STREAM:
                    wire_version = (cfg.metadata or {}).get(subjects.META_WIRE, "1")
                    if wire_version != str(wire.SCHEMA_VERSION):
                        return  # load_rules says what to do
                    rules = rules_from_metadata(cfg.metadata, self.config.rules())
                    cfg.max_msgs_per_subject = rules.max_events
                logger.info("updating stream %s to the configured settings", cfg.name)
                await self.js.update_stream(cfg)

    async def _enable_msg_ttl(self, cfg: StreamConfig) -> None:
        """Turn on per-message TTLs on a stream created before Asman needed them (queue
        policies, kept with ``Nats-TTL: never``). Additive and safe: nothing else changes,
        and a server that refuses leaves the stream as it was."""
        if not cfg.allow_msg_ttl or cfg.name is None:
            return
        existing = await self.js.stream_info(cfg.name)
        if existing.config.allow_msg_ttl:
            return
        existing.config.allow_msg_ttl = True
        try:
            await self.js.update_stream(existing.config)
            logger.info("stream %s: per-message TTLs turned on (queue policies)", cfg.name)
        except nats.js.errors.APIError as exc:
            logger.warning("stream %s: cannot turn on per-message TTLs: %s", cfg.name, exc)

    # -- events ------------------------------------------------------------------------

    async def append(
        self,
        subject: str,
        event: dict[str, Any],
        *,
        expected_last_seq: int,
        ttl: str | None = None,
    ) -> int:
        """Sign ``event`` and append it to ``subject`` by compare-and-set on the subject's
        last sequence (0 = the subject must be empty); returns its stream sequence.

        The event is chained: it names ``expected_last_seq`` as ``prev``, so the fold
        refuses it anywhere else (a replay). ``Conflict`` when someone wrote first.
        ``ttl`` is a per-message TTL (``"never"``: kept past the stream's max age).
        """
        body = {**event, "prev": expected_last_seq}
        data = wire.seal(self.key, subject, body)
        return await self._publish_event(subject, body, data, expected_last_seq, ttl)

    async def append_checked(
        self,
        subject: str,
        event: dict[str, Any],
        *,
        expected_last_seq: int,
        sent: dict[bytes, wire.Opened] | None = None,
    ) -> CheckedEvent:
        """``append``, returning the event as every reader will see it once verified (our
        own first-hand view: no need to verify our own signature; its server time is not
        known until read back). The envelope is added to ``sent`` before it is published,
        so a subscriber can tell our own events apart."""
        body = {**event, "prev": expected_last_seq}
        data, opened = wire.seal_opened(self.key, subject, body)
        if sent is not None:
            sent[data] = opened
        seq = await self._publish_event(subject, body, data, expected_last_seq)
        return CheckedEvent(seq, opened, "", None, len(data))

    async def append_signed(
        self, subject: str, envelope: bytes, opened: wire.Opened, *, expected_last_seq: int
    ) -> CheckedEvent:
        """Append an envelope another key signed (``opened`` is what ``wire.open_envelope``
        gave for it on ``subject``), as it is, by compare-and-set on ``expected_last_seq``.
        ``Conflict`` when someone wrote first; the caller checked the event."""
        seq = await self._publish_event(subject, opened.event, envelope, expected_last_seq)
        return CheckedEvent(seq, opened, "", None, len(envelope))

    async def _publish_event(
        self,
        subject: str,
        event: dict[str, Any],
        data: bytes,
        expected_last_seq: int,
        ttl: str | None = None,
    ) -> int:
        headers = {subjects.HDR_EXPECTED_LAST_SUBJECT_SEQ: str(expected_last_seq)}
        if ttl is not None:
            headers[subjects.HDR_TTL] = ttl
        what = f"appending {event.get('type', 'event')} to {subject}"
        with translate_errors(what, self):
            replies = await self._reply_inbox()
            reply = await replies.request_one(subject, data, headers, self.config.request_timeout_s)
            return _publish_ack(reply, what)

    async def _reply_inbox(self) -> _Replies:
        replies = self._replies
        if replies is not None and replies.nc is self.nc:
            return replies
        async with self._replies_lock:
            if self._replies is None or self._replies.nc is not self.nc:
                self._replies = await _Replies.open(self.nc)
            return self._replies

    async def read_subject(
        self,
        stream: str,
        subject: str,
        start_seq: int = 1,
        *,
        max_bytes: int | None = None,
        max_messages: int | None = None,
    ) -> list[RawEvent]:
        """Every message on ``subject`` from ``start_seq``, oldest first, each with the
        server's timestamp. With ``max_bytes`` or ``max_messages``, stops after the batch
        that reaches it (so it may return a little more).

        Uses batched direct get: one round trip per ``READ_BATCH`` messages (and at most
        ``READ_BATCH_BYTES``), served by any replica; or, with
        ``LogConfig(reads="consumer")``, a filtered consumer (``asman.log.filtered``).
        """
        if self.config.reads == "consumer":
            with translate_errors(f"reading {subject}", self):
                return await read_filtered(
                    self.js,
                    stream,
                    subject,
                    start_seq,
                    self.config.request_timeout_s,
                    max_bytes,
                    max_messages,
                )
        out: list[RawEvent] = []
        seq = start_seq
        total = 0
        while True:
            batch, more, last = await self._direct_batch_retrying(stream, subject, seq)
            out.extend(batch)
            total += sum(len(ev.data) for ev in batch)
            if not more or not batch or (max_bytes is not None and total > max_bytes):
                return out
            if max_messages is not None and len(out) >= max_messages:
                return out
            seq = last + 1

    async def _direct_batch_retrying(
        self, stream: str, subject: str, start_seq: int
    ) -> tuple[list[RawEvent], bool, int]:
        """Reads are idempotent: ride through a reconnect or a leader election."""
        for attempt in range(READ_RETRIES):
            try:
                return await self._direct_batch(stream, subject, start_seq, READ_BATCH)
            except LogUnavailable:
                if attempt == READ_RETRIES - 1:
                    raise
                logger.info("retrying read of %s", subject)
                await asyncio.sleep(0.25 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _direct_batch(
        self, stream: str, subject: str, start_seq: int, batch: int
    ) -> tuple[list[RawEvent], bool, int]:
        request = json.dumps(
            {
                "seq": start_seq,
                "next_by_subj": subject,
                "batch": batch,
                "max_bytes": READ_BATCH_BYTES,
            }
        )
        with translate_errors(f"reading {subject}", self):
            replies = await self._reply_inbox()
            msgs, status, detail = await replies.request(
                f"{self.api_prefix}.DIRECT.GET.{stream}",
                request.encode(),
                self.config.request_timeout_s,
            )
        if status not in ("404", "204"):
            _raise_status(status, detail, stream)
        out: list[RawEvent] = []
        last = start_seq - 1
        for msg in msgs:
            headers = msg.headers or {}
            last = int(headers["Nats-Sequence"])
            out.append(
                RawEvent(
                    seq=last,
                    data=msg.data,
                    subject=headers["Nats-Subject"],
                    ts=server_ms(headers.get("Nats-Time-Stamp")),
                )
            )
        # 204 with messages pending: there is more (a batch cut by count or by bytes)
        return out, status == "204" and detail not in ("", "0"), last

    async def publish_entry(
        self, subject: str, data: bytes, *, ttl: str | None = None, wait: bool = True
    ) -> None:
        """Write a hint that needs no signature (a waiting-index entry). With ``wait``,
        the server's acknowledgement is awaited; without, it is sent and forgotten (a lost
        hint costs a worker one read)."""
        headers = {subjects.HDR_TTL: ttl} if ttl else None
        what = f"writing {subject}"
        with translate_errors(what, self):
            if not wait:
                await self.nc.publish(subject, data, headers=headers)
                return
            replies = await self._reply_inbox()
            reply = await replies.request_one(subject, data, headers, self.config.request_timeout_s)
            _publish_ack(reply, what)

    async def last_seq(self, stream: str, subject: str) -> int:
        """Stream sequence of the last message on ``subject`` (0 if none)."""
        with translate_errors(f"reading {subject}", self):
            try:
                msg = await self.js.get_msg(stream, subject=subject, direct=True)
            except nats.js.errors.NotFoundError:
                return 0
        return int(msg.seq or 0)

    async def on_message(
        self, subject: str, callback: Callable[[str, bytes], None]
    ) -> Callable[[], Awaitable[None]]:
        """Call ``callback(subject, data)`` for every message published on ``subject``
        (wildcards allowed; live only, no history). Returns the coroutine function that stops
        it. A core subscription: it costs the server nothing that outlives the connection."""

        async def on_msg(msg: Msg) -> None:
            callback(msg.subject, msg.data)

        with translate_errors(f"subscribing to {subject}", self):
            sub = await self.nc.subscribe(subject, cb=on_msg)

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

        return stop

    async def wake_on(
        self,
        subject: str,
        wake: asyncio.Event,
        *,
        ignore: Callable[[bytes], bool] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """Set ``wake`` on every message published on ``subject`` (live only, no history),
        except those whose bytes ``ignore`` recognises (a lease's own events).

        Returns the coroutine function that stops it. Workers use it to learn at once that a
        job they run got a cancel or a foreign claim; watchers to re-read only on change.
        """

        async def on_msg(msg: Msg) -> None:
            if ignore is None or not ignore(msg.data):
                wake.set()

        with translate_errors(f"subscribing to {subject}", self):
            sub = await self.nc.subscribe(subject, cb=on_msg)

        async def stop() -> None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

        return stop


def _publish_ack(reply: Msg, what: str) -> int:
    """The stream sequence in a JetStream publish acknowledgement. Call it inside
    ``translate_errors``: a refusal is raised as nats-py raises it (no responders, the API
    error), so it becomes ``Conflict``/``LogError``/``LogUnavailable`` as for any request."""
    status = reply.headers.get("Status") if reply.headers else None
    if status == "503":
        raise nats.errors.NoRespondersError
    try:
        ack = json.loads(reply.data)
    except ValueError:
        raise LogError(f"{what}: JetStream answered {reply.data[:200]!r}") from None
    error = ack.get("error") if isinstance(ack, dict) else None
    if error is not None:
        known = error.get("err_code") in (ERR_MAX_MSGS_PER_SUBJECT, ERR_MESSAGE_TOO_LARGE)
        if error.get("code") == 503 and not known:  # JetStream not ready (restart, election)
            description = error.get("description", "")
            raise LogUnavailable(f"{what}: JetStream is unavailable: {description}")
        nats.js.errors.APIError.from_error(error)  # raises the API error it describes
    if not isinstance(ack, dict) or type(ack.get("seq")) is not int:
        raise LogError(f"{what}: JetStream answered {reply.data[:200]!r}")
    return int(ack["seq"])


class _Replies:
    """One wildcard inbox for the requests of a connection: batched direct gets and the
    publishes whose acknowledgement we wait for.

    A batch answers with its messages, then one status message (204 end of batch, 404 none,
    or an error); a publish is answered by one message. A request through nats-py costs a
    fresh inbox name, a future and a timer task; here each request has a counter token and
    its replies are gathered by the one callback.
    """

    def __init__(self, nc: NATS, prefix: str) -> None:
        self.nc = nc
        self.prefix = prefix
        self._next = 0
        self._waiting: dict[str, tuple[list[Msg], asyncio.Future[tuple[str, str]]]] = {}
        self._single: dict[str, asyncio.Future[Msg]] = {}

    @classmethod
    async def open(cls, nc: NATS) -> _Replies:
        self = cls(nc, nc.new_inbox())
        await nc.subscribe(f"{self.prefix}.*", cb=self._on_msg)
        return self

    async def _on_msg(self, msg: Msg) -> None:
        token = msg.subject[len(self.prefix) + 1 :]
        single = self._single.get(token)
        if single is not None:
            if not single.done():
                single.set_result(msg)
            return
        entry = self._waiting.get(token)
        if entry is None:
            return  # a reply to a request that timed out
        msgs, done = entry
        headers = msg.headers
        status = headers.get("Status") if headers else None
        if not status:
            msgs.append(msg)
            return
        if not done.done():
            if status == "204":
                done.set_result((status, headers.get("Nats-Num-Pending", "0") if headers else ""))
            else:
                done.set_result((status, headers.get("Description", "") if headers else ""))

    async def request(
        self, subject: str, payload: bytes, timeout: float
    ) -> tuple[list[Msg], str, str]:
        """(messages, status, Nats-Num-Pending for 204 or the description otherwise)."""
        self._next += 1
        token = str(self._next)
        msgs: list[Msg] = []
        done: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
        self._waiting[token] = (msgs, done)
        try:
            await self.nc.publish(subject, payload, reply=f"{self.prefix}.{token}")
            async with asyncio.timeout(timeout):
                status, detail = await done
        finally:
            del self._waiting[token]
        return msgs, status, detail

    async def request_one(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        """Publish and wait for the one reply (nats-py's ``TimeoutError`` after ``timeout``)."""
        self._next += 1
        token = str(self._next)
        done: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._single[token] = done
        try:
            await self.nc.publish(subject, payload, reply=f"{self.prefix}.{token}", headers=headers)
            try:
                async with asyncio.timeout(timeout):
                    return await done
            except TimeoutError:
                raise nats.errors.TimeoutError from None
        finally:
            del self._single[token]


def _auth_required(nc: NATS) -> bool:
    """Whether the server we are connected to requires auth (its INFO; nats-py keeps it in a
    private attribute, read here only)."""
    info = getattr(nc, "_server_info", None) or {}
    return bool(info.get("auth_required"))


def _shown(servers: Iterable[str]) -> str:
    """Server URLs for a message: a password in a URL (``nats://user:secret@host``, as the
    compose and Kubernetes recipes pass it) is never printed."""
    out = []
    for url in servers:
        parts = urlsplit(url)
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            url = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
        out.append(url)
    return ", ".join(out)


def _raise_status(status: str, description: str, stream: str) -> NoReturn:
    if status == "408":
        raise LogUnavailable(f"direct get on {stream} timed out: {description}")
    if status == "503":
        # no responders: the stream's replicas are still recovering (a cluster restart) or
        # electing a leader; transient, so reads retry it
        raise LogUnavailable(f"direct get on {stream}: no replica answers yet ({description})")
    raise LogError(f"direct get on {stream} failed: {status} {description}")
