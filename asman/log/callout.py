"""The auth callout of a public NATS server (deploy/nats/public): a queue's name is the
capability to use that queue, and nothing else.

nats-server hands every connection that is not one of its own users to this service
(``$SYS.REQ.USER.AUTH``, nats-server's "auth callout"). The connection presents the queues
it wants as user ``asman`` with the password ``<secret> <queue>…``
(``asman.log.permissions.Capability``; Asman's client does it by itself). The callout
checks the names (at most ``MAX_QUEUES``, each a valid queue name) and admits the connection
as a user of the Asman account whose permissions are exactly those queues' subjects and
JetStream API calls, worker and client (``queue_permissions``), and its own inbox. Anything
else (no user, another user, no queue, a bad name) is refused. The user is signed with the
callout's account key (the ``issuer`` in nats.conf), which nats-server checks.

The service also creates Asman's streams (as the server's trusted ``admin`` user): the
users it admits may not create them.

Secrets live in one folder (``init_secrets``): the issuer's seed, the callout user's and the
admin's passwords, one file each (mode 0600), and ``auth.conf``, the same values as NATS
config variables for nats.conf to include.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import nats
import nats.errors
from nats.aio.msg import Msg

from asman.errors import ConfigError, InvalidInput, LogUnavailable, NotAdmitted
from asman.log import natsjwt
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.permissions import MAX_QUEUES, read_capability

__all__ = ["AUTH_SUBJECT", "Callout", "CalloutConfig", "CalloutSecrets", "init_secrets"]

logger = logging.getLogger(__name__)

#: where nats-server sends its authorization requests
AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
#: callouts share the requests: run several for availability
QUEUE_GROUP = "asman-callout"
ISSUER_FILE = "issuer.seed"
CALLOUT_PASSWORD_FILE = "callout.password"
ADMIN_PASSWORD_FILE = "admin.password"
AUTH_CONF = "auth.conf"
RETRY_S = 1.0
_PASSWORD_RE = re.compile(r"[A-Za-z0-9_-]{8,256}")


@dataclass(frozen=True, slots=True)
class CalloutSecrets:
    issuer_seed: str
    callout_password: str
    admin_password: str

    @classmethod
    def load(cls, folder: Path) -> CalloutSecrets:
        def read(name: str) -> str:
            path = folder / name
            try:
                value = path.read_text().strip()
            except FileNotFoundError:
                raise ConfigError(
                    f"{path} does not exist: make the secrets once with `asman callout init "
                    f"{folder}` (deploy/nats/public/README.md)"
                ) from None
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
            if not value:
                raise ConfigError(f"{path} is empty")
            return value

        return cls(read(ISSUER_FILE), read(CALLOUT_PASSWORD_FILE), read(ADMIN_PASSWORD_FILE))


def _password() -> str:
    # letters and digits, starting with a letter: NATS config reads `123…` as a number
    return "p" + secrets.token_hex(24)


def init_secrets(folder: Path, *, admin_password: str | None = None) -> list[str]:
    """Make what is missing in ``folder`` (the issuer's seed, the passwords; an
    ``admin_password`` given replaces the admin's) and write ``auth.conf`` from them. Returns
    the names of the files it wrote. Keeps what exists, so it is safe on every start."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    made = {
        ISSUER_FILE: natsjwt.new_account_seed,
        CALLOUT_PASSWORD_FILE: _password,
        ADMIN_PASSWORD_FILE: _password,
    }
    written = []
    for name, make in made.items():
        path = folder / name
        given = admin_password if name == ADMIN_PASSWORD_FILE else None
        if given is not None and not _PASSWORD_RE.fullmatch(given):
            raise ConfigError(
                "the admin password must be 8 or more letters, digits, '-' or '_' (it goes "
                "into NATS URLs and config)"
            )
        if path.exists() and (given is None or path.read_text().strip() == given):
            continue
        _write_private(path, (given or make()) + "\n")
        written.append(name)
    loaded = CalloutSecrets.load(folder)
    issuer = natsjwt.Signer(loaded.issuer_seed).public_key
    conf = (
        "# Written by `asman callout init` from the files beside it; nats.conf includes it.\n"
        "# Keep this folder readable by nats-server and `asman callout` only.\n"
        f'ASMAN_CALLOUT_ISSUER: "{issuer}"\n'
        f'ASMAN_CALLOUT_PASSWORD: "{loaded.callout_password}"\n'
        f'ASMAN_ADMIN_PASSWORD: "{loaded.admin_password}"\n'
    )
    path = folder / AUTH_CONF
    if not path.exists() or path.read_text() != conf:
        _write_private(path, conf)
        written.append(AUTH_CONF)
    return written


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class CalloutConfig:
    """``servers`` without credentials: the callout logs in as ``callout_user`` (account AUTH)
    and, to create the streams, as ``admin_user`` (the Asman account), with the passwords of
    ``secrets_dir``. ``log`` gives the streams' settings (replicas, retention)."""

    servers: tuple[str, ...]
    secrets_dir: Path
    account: str = "ASMAN"
    callout_user: str = "callout"
    admin_user: str = "admin"
    domain: str | None = None
    max_queues: int = MAX_QUEUES
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.max_queues <= MAX_QUEUES:
            raise ConfigError(f"max queues must be 1 to {MAX_QUEUES}, not {self.max_queues}")


class Callout:
    """Answers nats-server's authorization requests. ``await Callout(config).serve(stop)``."""

    def __init__(self, config: CalloutConfig) -> None:
        self.config = config
        self.secrets = CalloutSecrets.load(config.secrets_dir)
        self.signer = natsjwt.Signer(self.secrets.issuer_seed)
        #: admitted and refused connections since start
        self.admitted = 0
        self.refused = 0

    # -- the decision ------------------------------------------------------------------

    def decide(self, token: bytes) -> bytes | None:
        """The response to one authorization request JWT; None for something that is not a
        valid request (no answer: the server refuses the connection when it times out)."""
        try:
            request = natsjwt.read_request(token.decode())
        except (InvalidInput, UnicodeDecodeError) as exc:
            logger.warning("ignored a message that is not an authorization request: %s", exc)
            return None
        try:
            capability = read_capability(request.user, request.password)
            if len(capability.queues) > self.config.max_queues:
                raise InvalidInput(
                    f"{len(capability.queues)} queues named: this server admits at most "
                    f"{self.config.max_queues} per connection"
                )
        except InvalidInput as exc:
            self.refused += 1
            logger.info("refused client=%s: %s", request.host, exc)
            return natsjwt.response_jwt(self.signer, request, error=str(exc)).encode()
        user = natsjwt.user_jwt(
            self.signer,
            request.user_nkey,
            self.config.account,
            capability.permissions(self.config.domain),
            name=request.user or "",
        )
        self.admitted += 1
        logger.info("admitted client=%s queues=%d", request.host, len(capability.queues))
        return natsjwt.response_jwt(self.signer, request, user=user).encode()

    # -- the service -------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        """Create the streams, then answer requests until ``stop`` is set. Waits for the
        server to come up; a refused login (wrong secrets) is an error at once."""
        if not await self._ensure_streams(stop):
            return
        nc = await self._connect(stop)
        if nc is None:
            return
        try:
            await nc.subscribe(AUTH_SUBJECT, queue=QUEUE_GROUP, cb=self._on_request)
            await nc.flush()
            if ready is not None:
                ready()
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()

    async def _on_request(self, msg: Msg) -> None:
        response = self.decide(msg.data)
        if response is not None and msg.reply:
            await msg.respond(response)

    def _admin_servers(self) -> tuple[str, ...]:
        user = quote(self.config.admin_user, safe="")
        password = quote(self.secrets.admin_password, safe="")
        out = []
        for url in self.config.servers:
            parts = urlsplit(url)
            netloc = f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"
            out.append(urlunsplit(parts._replace(netloc=netloc)))
        return tuple(out)

    async def _ensure_streams(self, stop: asyncio.Event) -> bool:
        config = replace(
            self.config.log,
            servers=self._admin_servers(),
            name="asman-callout-admin",
            domain=self.config.domain,
            manage_streams=True,
            reads="direct",
            inbox_prefix=None,
            queues=(),
        )
        waited = False
        while not stop.is_set():
            try:
                async with Log(config, PeerKey.generate()):
                    logger.info("Asman's streams are in place")
                    return True
            except LogUnavailable as exc:  # not up yet (a refused login is NotAdmitted)
                if not waited:
                    logger.warning("waiting for NATS: %s", exc)
                    waited = True
                await _sleep_or_stop(stop, RETRY_S)
        return False

    async def _connect(self, stop: asyncio.Event) -> Any:
        refused = False

        async def on_error(exc: Exception) -> None:
            nonlocal refused
            if "authorization violation" in str(exc).lower():
                refused = True
            logger.debug("callout connection: %s", exc)

        while not stop.is_set():
            refused = False
            try:
                nc = await nats.connect(
                    list(self.config.servers),
                    user=self.config.callout_user,
                    password=self.secrets.callout_password,
                    name="asman-callout",
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.5,
                    connect_timeout=5,
                    error_cb=on_error,
                )
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                if refused or "authorization violation" in str(exc).lower():
                    raise NotAdmitted(
                        f"NATS refused the callout user {self.config.callout_user!r}: its "
                        f"password in {self.config.secrets_dir} is not the one nats.conf "
                        "includes (auth.conf)"
                    ) from exc
                await _sleep_or_stop(stop, RETRY_S)
                continue
            nc.options["max_reconnect_attempts"] = -1  # once up, ride through restarts
            return nc
        return None


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()
