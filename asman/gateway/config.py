"""The gateway's configuration: one frozen dataclass tree, built by the CLI (or a test).

Library code never reads the environment; ``asman gateway`` and ``asman dev`` map their flags
and ``ASMAN_*`` variables onto these fields (docs/reference/http-api.md lists them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from asman.errors import ConfigError, InvalidQueueName
from asman.log.connection import LogConfig
from asman.log.definition import DefinitionLimits
from asman.log.namespaces import DEFAULT_GRACE, ReplaceGrace
from asman.log.subjects import validate_queue
from asman.peer.callbacks import CallbackSettings
from asman.peer.netguard import UrlPolicy

__all__ = ["GatewayConfig", "GatewayLimits"]

_KIB = 1024
_MIB = 1024 * _KIB


@dataclass(frozen=True, slots=True)
class GatewayLimits:
    """What one request, one definition and one client may cost.

    ``max_body_bytes`` bounds every JSON body; ``max_definition_bytes``,
    ``max_inline_bytes`` (one inline input file), ``max_total_inline_bytes`` and
    ``max_inputs`` (``inputs`` plus ``configFiles``) bound a job definition, and are checked
    before anything reaches the log. ``max_blob_bytes`` bounds one uploaded blob. Each client
    (remote address) gets a token bucket of ``rate_burst`` requests refilled at ``rate_per_s``,
    and at most ``max_streams_per_client`` open event streams.
    """

    max_body_bytes: int = 1 * _MIB
    max_definition_bytes: int = 256 * _KIB
    max_inline_bytes: int = 64 * _KIB
    max_total_inline_bytes: int = 192 * _KIB
    max_inputs: int = 256
    max_blob_bytes: int = 2 * 1024 * _MIB
    max_log_response_bytes: int = 1 * _MIB
    rate_per_s: float = 20.0
    rate_burst: int = 100
    max_streams_per_client: int = 16
    max_tracked_clients: int = 10_000

    def __post_init__(self) -> None:
        for name in (
            "max_body_bytes",
            "max_definition_bytes",
            "max_inline_bytes",
            "max_total_inline_bytes",
            "max_inputs",
            "max_blob_bytes",
            "max_log_response_bytes",
            "rate_burst",
            "max_streams_per_client",
            "max_tracked_clients",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"gateway limit {name} must be a whole number ≥ 1, got {value!r}")
        if not self.rate_per_s > 0:
            raise ConfigError(f"gateway limit rate_per_s must be > 0, got {self.rate_per_s!r}")
        if self.max_definition_bytes > self.max_body_bytes:
            raise ConfigError(
                "gateway limit max_definition_bytes must not exceed max_body_bytes "
                f"({self.max_definition_bytes} > {self.max_body_bytes})"
            )

    def definition_limits(self) -> DefinitionLimits:
        """The definition bounds as ``asman.log.definition`` checks them."""
        return DefinitionLimits(
            max_definition_bytes=self.max_definition_bytes,
            max_inline_bytes=self.max_inline_bytes,
            max_total_inline_bytes=self.max_total_inline_bytes,
            max_files=self.max_inputs,
        )


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """One gateway process.

    ``key_path`` holds the gateway's Ed25519 key (created on first start): everything the
    gateway appends to the log is signed with it. ``blobs_url`` ``None`` keeps blobs in the
    JetStream object store of the log; an S3 URL (``s3+http://HOST:PORT/BUCKET[/PREFIX]``,
    ``s3://...``, see ``S3Blobs.from_url``) with ``s3_access_key``/``s3_secret_key`` uses that
    bucket, and downloads and uploads are redirected to presigned URLs.

    ``cors_origins`` is the CORS allow-list (``("*",)``: any origin, never with credentials;
    ``()``: no CORS headers). ``trust_forwarded`` takes the client address for rate limits from
    the first ``X-Forwarded-For`` entry (only behind a proxy you run). ``public_url`` is the
    gateway's external base URL, used in links it hands out (compute-queues ``url`` refs);
    without it links are built from the request's ``Host``.

    ``exposed_queues`` are the queues the compute-queues routes without a queue
    (``/j/<id>/…``) search for a job id; ``()`` (the default) searches none, and those routes
    answer 400. A job id is computed from its definition, so on an exposed queue whoever
    knows (or guesses) a definition finds its job and its outputs: expose only public queues.

    ``allow_urls`` are the loopback or private destinations the gateway's callbacks may
    reach anyway (``UrlPolicy.parse``; by default public addresses only: a callback URL
    comes from whoever submits). ``callbacks`` says how they are delivered.

    ``replace_grace`` is how long a job replaced by a newer one in its namespace keeps
    running, by its age (compute-queues' values by default; ``asman.log.namespaces``).
    ``cq_finished_listed_s`` is how long compute-queues' listings (``GET /q/<queue>``,
    ``/q/<queue>/status``) keep a finished job after it finished (compute-queues: 60 s);
    Asman's own listings keep every job of the retention.
    """

    log: LogConfig
    key_path: Path
    host: str = "127.0.0.1"
    port: int = 8080
    blobs_url: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    limits: GatewayLimits = field(default_factory=GatewayLimits)
    cors_origins: tuple[str, ...] = ("*",)
    trust_forwarded: bool = False
    public_url: str | None = None
    exposed_queues: tuple[str, ...] = ()
    allow_urls: tuple[str, ...] = ()
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    presign_expires_s: int = 3600
    replace_grace: ReplaceGrace = DEFAULT_GRACE
    cq_finished_listed_s: float = 60.0
    name: str = "gateway"
    poll_s: float = 5.0
    sse_ping_s: float = 15.0
    shutdown_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"gateway port must be 0-65535, got {self.port!r}")
        if not self.host:
            raise ConfigError("gateway host must not be empty (use 127.0.0.1 or 0.0.0.0)")
        if self.blobs_url is not None and not (self.s3_access_key and self.s3_secret_key):
            raise ConfigError(
                f"blobs URL {self.blobs_url!r} needs S3 credentials: set the access key and "
                "the secret key (or leave the URL out to use the JetStream object store)"
            )
        for origin in self.cors_origins:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(
                    f"CORS origin {origin!r} must be '*' or an origin such as https://example.org"
                )
        if self.public_url is not None and not self.public_url.startswith(("http://", "https://")):
            raise ConfigError(f"public URL {self.public_url!r} must start with http(s)://")
        for queue in self.exposed_queues:
            try:
                validate_queue(queue)
            except InvalidQueueName as exc:
                raise ConfigError(f"exposed queue: {exc}") from exc
        if len(set(self.exposed_queues)) != len(self.exposed_queues):
            raise ConfigError(f"exposed queues {self.exposed_queues!r} name a queue twice")
        self.url_policy()  # checks the entries
        if not 1 <= self.presign_expires_s <= 7 * 24 * 3600:
            raise ConfigError("presign_expires_s must be between 1 s and 7 days")
        if not self.cq_finished_listed_s >= 0:
            raise ConfigError("gateway cq_finished_listed_s must be ≥ 0 seconds")
        for name in ("poll_s", "sse_ping_s", "shutdown_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"gateway {name} must be > 0")

    def url_policy(self) -> UrlPolicy:
        """Where the gateway's callbacks may go besides public addresses."""
        policy = UrlPolicy.parse(self.allow_urls)
        return dataclasses.replace(policy, who="the gateway", command="asman gateway")

    @property
    def address(self) -> str:
        """``http://host:port`` as configured (the CLI prints it)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"
