"""``asman callout``: the auth callout of a public NATS server (deploy/nats/public).

asman callout init SECRETS_DIR                 # once: the issuer key and the passwords
asman callout serve --secrets SECRETS_DIR      # beside nats-server
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from asman.cli.options import MAX_RETENTION_MS, asyncmain, stop_on_signals
from asman.errors import ConfigError
from asman.log.definition import parse_duration_ms
from asman.log.permissions import MAX_QUEUES

SECRETS_HELP = "Folder of the callout's secrets (`asman callout init` makes it)."


@click.group()
def callout() -> None:
    """Admit NATS connections for the queues they name, and nothing else."""


@callout.command("init")
@click.argument("secrets_dir", type=click.Path(file_okay=False))
@click.option(
    "--admin-password",
    envvar="ASMAN_ADMIN_PASSWORD",
    default=None,
    help="The trusted admin user's password (letters, digits, '-', '_') [default: a random "
    "one, kept once made].",
)
def callout_init(secrets_dir: str, admin_password: str | None) -> None:
    """Make the secrets in SECRETS_DIR: the issuer's seed, the callout's and the admin's
    passwords, and auth.conf for nats.conf to include. Keeps what exists."""
    from asman.log import natsjwt
    from asman.log.callout import CalloutSecrets, init_secrets

    folder = Path(secrets_dir)
    written = init_secrets(folder, admin_password=admin_password)
    issuer = natsjwt.Signer(CalloutSecrets.load(folder).issuer_seed).public_key
    made = ", ".join(written) if written else "nothing new"
    click.echo(f"{folder}: {made}; issuer {issuer}", err=True)


@callout.command("serve")
@click.option(
    "--nats",
    "nats_urls",
    envvar="ASMAN_NATS_URL",
    default="nats://127.0.0.1:4222",
    show_default=True,
    help="The NATS server(s), comma separated (credentials in them are ignored: the "
    "callout logs in with its secrets).",
)
@click.option(
    "--secrets",
    "secrets_dir",
    envvar="ASMAN_CALLOUT_SECRETS",
    required=True,
    type=click.Path(file_okay=False),
    help=SECRETS_HELP,
)
@click.option(
    "--account",
    envvar="ASMAN_CALLOUT_ACCOUNT",
    default="ASMAN",
    show_default=True,
    help="The account (with JetStream) that admitted connections join.",
)
@click.option(
    "--domain",
    envvar="ASMAN_DOMAIN",
    default=None,
    help="JetStream domain whose API the admitted connections may call.",
)
@click.option(
    "--max-queues",
    envvar="ASMAN_CALLOUT_MAX_QUEUES",
    default=MAX_QUEUES,
    show_default=True,
    type=click.IntRange(1, MAX_QUEUES),
    help="Queues one connection may name.",
)
@click.option(
    "--replicas",
    envvar="ASMAN_REPLICAS",
    default=1,
    show_default=True,
    type=click.IntRange(1, 5),
    help="Replicas of Asman's streams (when the callout creates them).",
)
@click.option(
    "--retention",
    envvar="ASMAN_RETENTION",
    default="7d",
    show_default=True,
    help="How long jobs and logs are kept (when the callout creates the streams).",
)
@asyncmain
async def callout_serve(
    nats_urls: str,
    secrets_dir: str,
    account: str,
    domain: str | None,
    max_queues: int,
    replicas: int,
    retention: str,
    **kwargs: Any,
) -> None:
    """Create Asman's streams, then answer the server's authorization requests."""
    from asman.log.callout import Callout, CalloutConfig
    from asman.log.connection import LogConfig

    servers = tuple(u.strip() for u in nats_urls.split(",") if u.strip())
    if not servers:
        raise ConfigError("--nats needs at least one URL, e.g. nats://127.0.0.1:4222")
    retention_ms = parse_duration_ms(retention, "--retention")
    if retention_ms > MAX_RETENTION_MS:
        raise ConfigError(f"--retention is at most {MAX_RETENTION_MS // 86_400_000}d")
    config = CalloutConfig(
        servers=servers,
        secrets_dir=Path(secrets_dir),
        account=account,
        domain=domain,
        max_queues=max_queues,
        log=LogConfig(servers=servers, replicas=replicas, retention_s=retention_ms // 1000),
    )
    service = Callout(config)
    await service.serve(
        stop_on_signals(),
        ready=lambda: click.echo(
            f"callout for {', '.join(servers)}: admitting connections for the queues they "
            f"name (issuer {service.signer.public_key})",
            err=True,
        ),
    )
