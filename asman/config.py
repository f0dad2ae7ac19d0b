"""Configuration: one frozen tree, built in one place.

Precedence: command-line flag > ``ASMAN_*`` environment variable > config file > default.
The CLI gets the first two from click (each option names its variable) and the config file
through click's ``default_map``; library code never reads ``os.environ``.

The config file is TOML (``~/.config/asman/config.toml`` or ``$ASMAN_CONFIG``); its keys are
the long option names with ``_`` for ``-``, at the top level or in a table per command::

    nats = "nats://hub.example.org:4222"
    domain = "hub"
    [worker]
    slots = 4
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asman.errors import ConfigError

__all__ = [
    "BlobSettings",
    "ClientSettings",
    "default_config_dir",
    "default_data_dir",
    "load_config_file",
]


def default_config_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(base) / "asman"


def default_data_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or str(
        Path(env.get("HOME", "~")).expanduser() / ".local" / "share"
    )
    return Path(base) / "asman"


@dataclass(frozen=True, slots=True)
class BlobSettings:
    """Where blobs go: ``url`` None is the JetStream object store (the default); otherwise an
    S3 URL (``s3+http://host:port/bucket/prefix``, ``s3://host/bucket``) with credentials."""

    url: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    region: str = "us-east-1"

    def describe(self) -> str:
        return self.url or "the JetStream object store (ASMAN_BLOBS)"


@dataclass(frozen=True, slots=True)
class ClientSettings:
    """What every command that talks to the log needs."""

    servers: tuple[str, ...]
    domain: str | None
    creds: str | None
    key_file: Path
    blobs: BlobSettings
    replicas: int = 1
    retention_s: int = 7 * 24 * 3600
    blob_max_bytes: int | None = None  # None: 10 GiB on creation, an existing bucket unchanged
    lease_ttl_s: float = 30.0
    max_attempts: int = 3
    manage_streams: bool = True
    update_streams: bool = False
    reads: str = "direct"
    inbox_prefix: str | None = None
    # the queues the command uses: a connection without credentials names them, which is
    # all a public server (deploy/nats/public) asks
    queues: tuple[str, ...] = ()


def load_config_file(path: Path, *, required: bool) -> dict[str, Any]:
    """Read a TOML config file into click's ``default_map`` shape."""
    if not path.exists():
        if required:
            raise ConfigError(f"config file {path} does not exist")
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path}: {exc}") from exc
    return data
