"""The CLI's plumbing: shared options, the config file as click defaults, settings, the
async runner, JSON output and logging, and building a job definition from the command line.
The commands themselves are in ``asman.cli``."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from asman.config import (
    BlobSettings,
    ClientSettings,
    default_config_dir,
    load_config_file,
)
from asman.errors import AsmanError, ConfigError, InvalidInput
from asman.log.definition import parse_duration_ms, parse_size_bytes

T = TypeVar("T")

#: the longest --retention: a JetStream max age is nanoseconds in an int64 (~292 years)
MAX_RETENTION_MS = 36_500 * 86_400_000

logger = logging.getLogger("asman")


# -- plumbing ----------------------------------------------------------------------------


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def stop_on_signals() -> asyncio.Event:
    """The CLI's only signal handlers: SIGINT/SIGTERM set an event, nothing more."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


class AsmanGroup(click.Group):
    """Turns every AsmanError into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AsmanError as exc:
            click.echo(f"asman: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("asman: interrupted", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug: one line, and the traceback only with -vv
            logger.debug("internal error", exc_info=True)
            click.echo(
                f"asman: internal error: {type(exc).__name__}: {exc} (run with -vv for the "
                "traceback, and please report it)",
                err=True,
            )
            ctx.exit(1)


def config_default_map(group: click.Group, data: dict[str, Any]) -> dict[str, Any]:
    """click's ``default_map`` from a config file's contents.

    Keys are long option names (``nats``, ``max-job-duration`` or ``max_job_duration``):
    at the top level they apply to every command that has the option, in a ``[command]``
    table to that command (and its subcommands). A key no command knows is an error.
    """
    top = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    for name in tables:
        if name not in group.commands:
            raise ConfigError(f"config file: [{name}] is not a command of asman")
    used: set[str] = set()

    def for_command(cmd: click.Command, values: dict[str, Any], where: str) -> dict[str, Any]:
        params = {
            opt.lstrip("-").replace("-", "_"): p.name
            for p in cmd.params
            if isinstance(p, click.Option) and p.name
            for opt in p.opts
            if opt.startswith("--")
        }
        out: dict[str, Any] = {}
        for key, value in values.items():
            name = params.get(key.replace("-", "_"))
            if name is not None:
                out[name] = value
                used.add(key)
            elif where and not isinstance(cmd, click.Group):
                raise ConfigError(
                    f"config file: [{where}] {key} is not an option of `asman {where}`"
                )
        if isinstance(cmd, click.Group):
            for sub_name, sub in cmd.commands.items():
                out[sub_name] = for_command(sub, values, "")
        return out

    result = {
        name: for_command(cmd, {**top, **tables.get(name, {})}, name if name in tables else "")
        for name, cmd in group.commands.items()
    }
    unknown = sorted(set(top) - used)
    if unknown:
        raise ConfigError(
            f"config file: {unknown[0]} is not an option of any asman command "
            "(see docs/reference/cli.md)"
        )
    return result


def config_file_data() -> dict[str, Any]:
    env = os.environ
    explicit = env.get("ASMAN_CONFIG")
    path = Path(explicit) if explicit else default_config_dir(env) / "config.toml"
    return load_config_file(path, required=bool(explicit))


def log_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options of every command that talks to the log and the blob store."""
    options = [
        click.option(
            "--nats",
            "nats_urls",
            envvar="ASMAN_NATS_URL",
            default="nats://127.0.0.1:4222",
            show_default=True,
            help="NATS server URL(s), comma separated.",
        ),
        click.option(
            "--domain",
            envvar="ASMAN_DOMAIN",
            default=None,
            help="JetStream domain of the queues (e.g. 'hub' from a leaf node).",
        ),
        click.option(
            "--creds",
            envvar="ASMAN_CREDS",
            default=None,
            type=click.Path(dir_okay=False),
            help="NATS credentials file.",
        ),
        click.option(
            "--blobs",
            "blobs_url",
            envvar="ASMAN_BLOBS",
            default=None,
            help="Blob store: the JetStream object store by default, or an S3 URL "
            "(s3+http://host:port/bucket); credentials from ASMAN_S3_ACCESS_KEY/"
            "ASMAN_S3_SECRET_KEY or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY.",
        ),
        click.option(
            "--key-file",
            envvar="ASMAN_KEY_FILE",
            default=None,
            type=click.Path(dir_okay=False),
            help="This peer's Ed25519 key.",
        ),
        click.option(
            "--replicas",
            envvar="ASMAN_REPLICAS",
            default=1,
            show_default=True,
            type=click.IntRange(1, 5),
            help="Replicas of Asman's streams.",
        ),
        click.option(
            "--retention",
            envvar="ASMAN_RETENTION",
            default="7d",
            show_default=True,
            help="How long jobs, logs and results are kept.",
        ),
        click.option(
            "--blob-max-bytes",
            envvar="ASMAN_BLOB_MAX_BYTES",
            default=None,
            help="Size limit of the object store bucket, e.g. 50GiB; 0 for none [default: "
            "10GiB when this peer creates the bucket; an existing one changes only when "
            "this is given].",
        ),
        click.option(
            "--lease-ttl",
            envvar="ASMAN_LEASE_TTL",
            default="30s",
            show_default=True,
            help="The lease grace: a challenged lease holder has this long to answer (written "
            "into the jobs stream when this peer creates it; peers use the stream's).",
        ),
        click.option(
            "--max-attempts",
            envvar="ASMAN_MAX_ATTEMPTS",
            default=3,
            show_default=True,
            type=click.IntRange(1, 100),
            help="Attempts before a job is worker_lost.",
        ),
        click.option(
            "--manage-streams/--no-manage-streams",
            envvar="ASMAN_MANAGE_STREAMS",
            default=True,
            show_default=True,
            help="Create Asman's streams when missing (off for confined credentials).",
        ),
        click.option(
            "--update-streams",
            envvar="ASMAN_UPDATE_STREAMS",
            is_flag=True,
            help="Change existing streams to --replicas/--retention (operators only).",
        ),
        click.option(
            "--reads",
            envvar="ASMAN_READS",
            type=click.Choice(["direct", "consumer"]),
            default="direct",
            show_default=True,
            help="How jobs are read: batched direct get, or subject-filtered consumers "
            "(for credentials confined to one queue, see docs/operations.md).",
        ),
        click.option(
            "--inbox-prefix",
            envvar="ASMAN_INBOX_PREFIX",
            default=None,
            help="Reply subject prefix the credentials allow (e.g. _INBOX.worker-a).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def settings_from(kwargs: dict[str, Any], queues: tuple[str, ...] = ()) -> ClientSettings:
    """Pop the log options out of ``kwargs`` into ClientSettings; ``queues`` are the ones
    the command uses (a connection without credentials names them)."""
    env = os.environ
    servers = tuple(u.strip() for u in kwargs.pop("nats_urls").split(",") if u.strip())
    if not servers:
        raise ConfigError("--nats needs at least one URL, e.g. nats://127.0.0.1:4222")
    key_file = kwargs.pop("key_file")
    retention_ms = parse_duration_ms(kwargs.pop("retention"), "--retention")
    if retention_ms > MAX_RETENTION_MS:
        raise ConfigError(
            f"--retention is at most {MAX_RETENTION_MS // 86_400_000}d, not "
            f"{retention_ms // 86_400_000}d (JetStream's limit is ~292 years)"
        )
    lease_ms = parse_duration_ms(kwargs.pop("lease_ttl"), "--lease-ttl")
    blob_max = kwargs.pop("blob_max_bytes")
    return ClientSettings(
        servers=servers,
        domain=kwargs.pop("domain"),
        creds=kwargs.pop("creds"),
        key_file=Path(key_file) if key_file else default_config_dir(env) / "peer.key",
        blobs=BlobSettings(
            url=kwargs.pop("blobs_url"),
            access_key=env.get("ASMAN_S3_ACCESS_KEY") or env.get("AWS_ACCESS_KEY_ID"),
            secret_key=env.get("ASMAN_S3_SECRET_KEY") or env.get("AWS_SECRET_ACCESS_KEY"),
        ),
        replicas=kwargs.pop("replicas"),
        retention_s=max(1, retention_ms // 1000),
        blob_max_bytes=parse_size_bytes(blob_max, "--blob-max-bytes") if blob_max else None,
        lease_ttl_s=lease_ms / 1000,
        max_attempts=kwargs.pop("max_attempts"),
        manage_streams=kwargs.pop("manage_streams"),
        update_streams=kwargs.pop("update_streams"),
        reads=kwargs.pop("reads"),
        inbox_prefix=kwargs.pop("inbox_prefix"),
        queues=queues,
    )


def asyncmain(f: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
    @wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run_async(f(*args, **kwargs))  # type: ignore[arg-type]

    return wrapper


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


def build_definition(
    image: str | None,
    command: tuple[str, ...],
    definition_file: str | None,
    env: tuple[str, ...],
    workdir: str | None,
    max_duration: str | None,
    gpus: int | None,
    cpus: float | None,
    memory: str | None,
    tags: tuple[str, ...],
) -> dict[str, Any]:
    definition: dict[str, Any] = {}
    if definition_file:
        try:
            text = sys.stdin.read() if definition_file == "-" else Path(definition_file).read_text()
            loaded = json.loads(text)
        except OSError as exc:
            raise InvalidInput(
                f"cannot read --definition {definition_file}: {exc.strerror}"
            ) from exc
        except json.JSONDecodeError as exc:
            raise InvalidInput(
                f"--definition {definition_file} is not valid JSON: {exc.msg} at line "
                f"{exc.lineno} column {exc.colno}"
            ) from exc
        if not isinstance(loaded, dict):
            raise InvalidInput(f"--definition {definition_file} must hold a JSON object")
        definition.update(loaded)
    if image:
        definition["image"] = image
    if command:
        definition["command"] = shlex.join(command)
    if env:
        merged = dict(definition.get("env") or {})
        for item in env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise InvalidInput(f"--env {item!r} must be NAME=VALUE")
            merged[name] = value
        definition["env"] = merged
    if workdir:
        definition["workdir"] = workdir
    if max_duration:
        definition["maxDuration"] = max_duration
    requirements = dict(definition.get("requirements") or {})
    if gpus is not None:
        requirements["gpus"] = gpus
    if cpus is not None:
        requirements["cpus"] = cpus
    if memory:
        requirements["memory"] = memory
    if requirements:
        definition["requirements"] = requirements
    if tags:
        definition["tags"] = list(tags)
    if "image" not in definition and "build" not in definition:
        raise InvalidInput("give an IMAGE (or a --definition file with an image or a build)")
    return definition


def definition_options(f: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option(
            "--definition",
            "definition_file",
            default=None,
            help="A job definition JSON file ('-' for stdin); flags override it.",
        ),
        click.option("--env", "-e", multiple=True, help="NAME=VALUE, repeatable."),
        click.option("--workdir", "-w", default=None, help="Working directory in the container."),
        click.option("--max-duration", default=None, help="e.g. 30s, 10m, 2h."),
        click.option(
            "--gpus", type=click.IntRange(0, 64), default=None, help="GPUs the job needs."
        ),
        click.option(
            "--cpus", type=click.FloatRange(0.01, 1024), default=None, help="CPUs the job may use."
        ),
        click.option("--memory", default=None, help="Memory the job may use, e.g. 512m, 2g."),
        click.option("--tag", "tags", multiple=True, help="A tag, repeatable."),
    ]
    for option in reversed(options):
        f = option(f)
    return f
