"""The ``asman`` command: parse, build settings, ``asyncio.run``. Nothing else lives here.

Exit codes (docs/reference/cli.md): 0 ok; 1 other error; 2 bad input or usage; 3 the log
(NATS) failed; 4 the container runtime failed. ``asman submit --wait`` exits with the job's
own exit code, or 124 timed out, 125 error, 130 cancelled, 75 worker lost.
"""

from __future__ import annotations

import base64
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

import click

from asman import __version__
from asman.cli.callout import callout
from asman.cli.options import (
    AsmanGroup,
    asyncmain,
    build_definition,
    config_default_map,
    config_file_data,
    definition_options,
    emit_json,
    log_options,
    run_async,
    settings_from,
    stop_on_signals,
)
from asman.config import (
    default_config_dir,
    default_data_dir,
)
from asman.errors import AsmanError, InvalidInput
from asman.log.definition import parse_duration_ms, parse_size_bytes
from asman.log.events import validate_namespace
from asman.logsetup import configure_logging
from asman.peer.caps import DEFAULT_OUTPUT_FILES, DEFAULT_PIDS

EXIT_BY_REASON = {"timed_out": 124, "error": 125, "cancelled": 130, "worker_lost": 75}

logger = logging.getLogger("asman")


# -- root --------------------------------------------------------------------------------


@click.group(cls=AsmanGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="asman")
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    envvar="ASMAN_LOG_FORMAT",
    show_default=True,
    help="Log lines as text or JSON.",
)
@click.pass_context
def main(ctx: click.Context, verbose: int, log_format: str) -> None:
    """Asman: public compute queues on a shared log.

    Put a Docker job on a queue; any worker that joined the queue runs it.
    """
    configure_logging(verbose, log_format)


# -- submit ------------------------------------------------------------------------------


@main.command()
@click.argument("queue")
@click.argument("image", required=False)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--file",
    "-f",
    "files",
    multiple=True,
    help="PATH (→ /inputs/<basename>) or PATH=NAME (→ /inputs/NAME); a folder keeps "
    "its tree. Repeatable.",
)
@definition_options
@click.option(
    "--wait", is_flag=True, help="Stream logs, download outputs, exit with the job's code."
)
@click.option(
    "--outputs",
    "-o",
    "outputs_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Where --wait puts the outputs [default: ./outputs/<short id>, the first 12 "
    "characters of the job id].",
)
@click.option("--rerun", is_flag=True, help="Run again even if a result is cached.")
@click.option(
    "--namespace",
    default=None,
    help="Hold the job for this namespace: a newer job you submit there replaces it "
    "(compute-queues' control.namespace) [default: _, which replaces nothing].",
)
@click.option(
    "--on-queued",
    metavar="URL",
    default=None,
    help="POST a signed JSON callback to URL once the job is on the queue (this command "
    "sends it, retried for up to 10 minutes before it exits).",
)
@click.option(
    "--on-finished",
    metavar="URL",
    default=None,
    help="POST a signed JSON callback to URL when the job finishes (the worker sends it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@log_options
@asyncmain
async def submit(
    queue: str,
    image: str | None,
    command: tuple[str, ...],
    files: tuple[str, ...],
    wait: bool,
    outputs_dir: str | None,
    rerun: bool,
    namespace: str | None,
    on_queued: str | None,
    on_finished: str | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """Put a job on QUEUE: run IMAGE [-- CMD...]. Prints the job id.

    With --namespace, the jobs you submitted earlier to that namespace of QUEUE are
    replaced: each is cancelled once no other namespace holds it, after compute-queues'
    grace (none for a job up to 20 s old, 4 s past that, 8 s past a minute), which this
    command waits for."""
    from asman.log.control import validate_control
    from asman.log.subjects import validate_queue
    from asman.peer.client import Client, collect_files
    from asman.render import Transfer, print_logs, result_json

    validate_queue(queue)
    settings = settings_from(kwargs, (queue,))
    if namespace is not None:
        validate_namespace(namespace)
    definition = build_definition(
        image,
        command,
        kwargs.pop("definition_file"),
        kwargs.pop("env"),
        kwargs.pop("workdir"),
        kwargs.pop("max_duration"),
        kwargs.pop("gpus"),
        kwargs.pop("cpus"),
        kwargs.pop("memory"),
        kwargs.pop("tags"),
    )
    callbacks: dict[str, Any] = {}
    for event, url in (("queued", on_queued), ("finished", on_finished)):
        if url is not None:
            try:
                validate_control({"callbacks": {event: {"url": url}}})
            except InvalidInput:
                raise InvalidInput(
                    f"--on-{event} {url[:200]!r} is not an absolute http:// or https:// URL"
                ) from None
            callbacks[event] = {"url": url}
    control = validate_control({"callbacks": callbacks} if callbacks else None)
    inputs = collect_files(files)
    async with Client.connect(settings) as client, client.callback_sender() as sender:
        with Transfer(enabled=not as_json) as progress:
            sub = await client.submit(
                queue,
                definition,
                files=inputs,
                rerun=rerun,
                progress=progress.update,
                namespace=namespace,
                control=control,
                callbacks=sender,
            )
        if not as_json:
            for r in sub.replacing:
                grace = f", in {r.delay_ms / 1000:g} s" if r.delay_ms else ""
                click.echo(
                    f"(replaces job {r.job_id[:12]} in namespace {r.namespace!r}{grace})", err=True
                )
        # replaced jobs first (their graces are seconds; the logs are replayed from the start)
        # a replaced job that never ran is finished by this command: it sends the callback
        await client.replace(sub.replacing, callbacks=sender)
        if not wait:
            if as_json:
                emit_json(
                    {
                        "job_id": sub.job_id,
                        "queue": queue,
                        "created": sub.created,
                        "cached": sub.cached,
                        "state": sub.state.state,
                        "namespace": sub.namespace,
                        "replaced": [r.job_id for r in sub.replacing],
                    }
                )
            else:
                click.echo(sub.job_id)
                if sub.cached:
                    click.echo(
                        "(finished earlier: the result is cached; --rerun runs it again)", err=True
                    )
            if sender.pending:
                click.echo("delivering callbacks… (Ctrl-C gives up)", err=True)
            return
        if not as_json:
            click.echo(f"job {sub.job_id} on queue {queue}", err=True)
            state = await print_logs(client, queue, sub.job_id)
        else:
            state = await client.wait(queue, sub.job_id)
        dest = Path(outputs_dir) if outputs_dir else Path("outputs") / sub.job_id[:12]
        with Transfer(enabled=not as_json) as progress:
            written = await client.download_outputs(state, dest, progress=progress.update)
        assert state.result is not None
        if as_json:
            emit_json(result_json(state) | {"outputs_dir": str(dest)})
        else:
            summary = f"{state.result.reason}"
            if state.result.exit_code is not None:
                summary += f", exit code {state.result.exit_code}"
            if state.result.duration_ms is not None:
                summary += f", {state.result.duration_ms / 1000:.2f}s"
            if state.result.message and state.result.reason != "cancelled":
                summary += f": {state.result.message}"
            click.echo(f"job {sub.job_id[:12]}: {summary}", err=True)
            if written:
                click.echo(f"{len(written)} output file(s) in {dest}/", err=True)
        raise SystemExit(job_exit_code(state))


def job_exit_code(state: Any) -> int:
    result = state.result
    if result.reason in ("success", "failed"):
        return int(result.exit_code or 0) & 0xFF
    return EXIT_BY_REASON.get(result.reason, 1)


# -- watch and jobs ----------------------------------------------------------------------


@main.command()
@click.argument("queue")
@click.argument("job", required=False)
@click.option("--once", is_flag=True, help="Render once and exit.")
@log_options
@asyncmain
async def watch(queue: str, job: str | None, once: bool, **kwargs: Any) -> None:
    """Live table of QUEUE's jobs and workers (or of one JOB), updating in place."""
    from asman.peer.client import Client
    from asman.render import watch_queue

    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        await watch_queue(client, queue, job, once=once, stop=stop_on_signals())


@main.group()
def jobs() -> None:
    """List, show, follow, fetch and cancel jobs."""


@jobs.command("ls")
@click.argument("queue")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def jobs_ls(queue: str, as_json: bool, **kwargs: Any) -> None:
    """The jobs of QUEUE."""
    from asman.peer.client import Client
    from asman.render import jobs_table, state_json

    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        states = await client.jobs(queue)
    if as_json:
        emit_json([state_json(s) for s in states])
    else:
        jobs_table(states)


@jobs.command("show")
@click.argument("queue")
@click.argument("job")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def jobs_show(queue: str, job: str, as_json: bool, **kwargs: Any) -> None:
    """One job: definition, state, result."""
    from asman.peer.client import Client
    from asman.render import show_job, state_json

    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        state = await client.state(queue, job)
    if as_json:
        emit_json(state_json(state, full=True))
    else:
        show_job(state)


@jobs.command("logs")
@click.argument("queue")
@click.argument("job")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job finishes.")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def jobs_logs(queue: str, job: str, follow: bool, as_json: bool, **kwargs: Any) -> None:
    """A job's logs (stdout to stdout; stderr, build and system lines to stderr)."""
    from asman.peer.client import Client
    from asman.render import print_logs

    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        if follow and not as_json:
            await print_logs(client, queue, job)
            return
        chunks = await client.logs(queue, job)
        if as_json:
            emit_json(
                [
                    {
                        "seq": c.seq,
                        "attempt": c.attempt,
                        "stream": c.stream,
                        "ts": c.ts,
                        "text": c.data.decode(errors="replace"),
                    }
                    for c in chunks
                ]
            )
            return
        for c in chunks:
            out = sys.stdout.buffer if c.stream == "stdout" else sys.stderr.buffer
            out.write(c.data)
            out.flush()


@jobs.command("outputs")
@click.argument("queue")
@click.argument("job")
@click.option(
    "--dir",
    "-o",
    "dest",
    default=None,
    type=click.Path(file_okay=False),
    help="[default: ./outputs/<short id>, the first 12 characters of the job id]",
)
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def jobs_outputs(
    queue: str, job: str, dest: str | None, as_json: bool, **kwargs: Any
) -> None:
    """Download a finished job's outputs (sha256 verified)."""
    from asman.peer.client import Client
    from asman.render import Transfer

    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        state = await client.state(queue, job)
        target = Path(dest) if dest else Path("outputs") / job[:12]
        with Transfer(enabled=not as_json) as progress:
            written = await client.download_outputs(state, target, progress=progress.update)
    if as_json:
        emit_json([str(p) for p in written])
    else:
        for p in written:
            click.echo(str(p))


@jobs.command("cancel")
@click.argument("queue")
@click.argument("job")
@click.option(
    "--namespace",
    default=None,
    help="Remove only this namespace from the job ('*': every one you may); it is "
    "cancelled once no namespace holds it.",
)
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def jobs_cancel(
    queue: str, job: str, namespace: str | None, as_json: bool, **kwargs: Any
) -> None:
    """Cancel a job you submitted (a running one is stopped by its worker)."""
    from asman.peer.client import Client
    from asman.render import state_json

    if namespace is not None:
        validate_namespace(namespace, allow_all=True)
    async with (
        Client.connect(settings_from(kwargs, (queue,))) as client,
        client.callback_sender() as sender,
    ):
        state = await client.cancel(queue, job, namespace=namespace, callbacks=sender)
    if as_json:
        emit_json(state_json(state))
    elif state.finished:
        click.echo(f"{job[:12]}: {state.reason}")
    elif state.cancel_requested:
        click.echo(f"{job[:12]}: cancel requested; its worker is stopping it")
    else:
        held = ", ".join(state.namespaces)
        click.echo(f"{job[:12]}: {state.state}, still held by namespace(s) {held}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Say what would be carried over; change nothing.")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def migrate(dry_run: bool, as_json: bool, **kwargs: Any) -> None:
    """Upgrade a NATS server's Asman streams from wire v1 (Asman 0.1) to v2, once.

    Unfinished v1 jobs are submitted again (signed by this key); finished v1 results are
    not carried over (docs/operations.md, "Upgrading")."""
    from asman.peer.client import migrate_log

    report = await migrate_log(settings_from(kwargs), dry_run=dry_run)
    if as_json:
        emit_json(
            {
                "found_v1": report.found_v1,
                "dry_run": dry_run,
                "jobs_seen": report.jobs_seen,
                "carried": [{"queue": q, "job": j} for q, j in report.carried],
                "finished_left": report.finished_left,
                "unreadable": report.unreadable,
            }
        )
    else:
        click.echo(("(dry run) " if dry_run else "") + report.summary())


# -- queue, url, keys --------------------------------------------------------------------


@main.group()
def queue() -> None:
    """Queues: a queue is a name; knowing it is the capability to use it."""


def new_queue_name() -> str:
    """128 random bits, base32 without padding, lower case: 26 characters."""
    return base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


@queue.command("new")
@click.option(
    "--private",
    is_flag=True,
    help="Bind the name to this key and write a policy: only this key submits and works "
    "until you change it (`asman queue trust`, `asman queue policy set`).",
)
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def queue_new(private: bool, as_json: bool, **kwargs: Any) -> None:
    """Print a new unguessable queue name."""
    if not private:
        name = new_queue_name()
        if as_json:
            emit_json({"queue": name})
        else:
            click.echo(name)
        return
    import dataclasses

    from asman.log import queues
    from asman.log.keys import PeerKey
    from asman.log.policy import Policy, new_private_queue
    from asman.peer.client import Client

    settings = settings_from(kwargs)
    me = PeerKey.load_or_create(settings.key_file).peer_id
    name = new_private_queue(me)  # named when connecting (a public server admits it)
    async with Client.connect(dataclasses.replace(settings, queues=(name,))) as client:
        written = await queues.write_policy(
            client.log,
            name,
            lambda _: Policy.private(name, me),
        )
    if as_json:
        emit_json({"queue": name, "policy": written.to_json()})
    else:
        click.echo(name)
        click.echo(
            f"private: only your key ({me[:12]}…) submits and works; add a worker with "
            f"`asman queue trust {name} KEY`",
            err=True,
        )


from asman.cli.queues import certify, policy_group, trust, untrust  # noqa: E402

queue.add_command(policy_group)
queue.add_command(trust)
queue.add_command(untrust)
main.add_command(certify)


@main.command()
@click.argument("image", required=False)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--queue", "-q", default=None, help="The queue the link submits to.")
@click.option(
    "--base",
    envvar="ASMAN_GATEWAY_URL",
    default=None,
    help="The gateway the link opens [default: the gateway of the `asman dev` running with "
    "the default data dir (or ASMAN_DATA_DIR), else http://127.0.0.1:8080].",
)
@definition_options
@click.option("--json", "as_json", is_flag=True)
def url(
    image: str | None,
    command: tuple[str, ...],
    queue: str | None,
    base: str | None,
    as_json: bool,
    **kwargs: Any,
) -> None:
    """The browser link for a job: its definition in the URL hash (compute-queues' format)."""
    try:
        from asman.log.definition import job_id, validate_definition
        from asman.log.subjects import validate_queue
        from asman.peer.links import job_link

        if queue:
            validate_queue(queue)
        definition = validate_definition(
            build_definition(
                image,
                command,
                kwargs["definition_file"],
                kwargs["env"],
                kwargs["workdir"],
                kwargs["max_duration"],
                kwargs["gpus"],
                kwargs["cpus"],
                kwargs["memory"],
                kwargs["tags"],
            )
        )
        if base is None:
            from asman.dev import dev_gateway_url

            data_dir = os.environ.get("ASMAN_DATA_DIR")
            dev_dir = Path(data_dir) if data_dir else default_data_dir(os.environ) / "dev"
            base = dev_gateway_url(dev_dir) or "http://127.0.0.1:8080"
        link = job_link(base, definition, queue=queue)
    except AsmanError as exc:
        click.echo(f"asman: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    if as_json:
        emit_json({"url": link, "job_id": job_id(definition), "queue": queue})
    else:
        click.echo(link)


@main.command()
@click.option("--key-file", envvar="ASMAN_KEY_FILE", default=None, type=click.Path(dir_okay=False))
@click.option("--create", is_flag=True, help="Create the key if it does not exist.")
@click.option("--json", "as_json", is_flag=True)
def keys(key_file: str | None, create: bool, as_json: bool) -> None:
    """Show this peer's id (its Ed25519 public key)."""
    from asman.errors import KeyFileError
    from asman.log.keys import PeerKey

    path = Path(key_file) if key_file else default_config_dir(os.environ) / "peer.key"
    try:
        key = PeerKey.load_or_create(path) if create else PeerKey.load(path)
    except KeyFileError as exc:
        if not path.exists() and not create:
            click.echo(f"asman: no key at {path} yet: run `asman keys --create`", err=True)
            raise SystemExit(2) from None
        click.echo(f"asman: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    if as_json:
        emit_json({"peer_id": key.peer_id, "key_file": str(path)})
    else:
        click.echo(key.peer_id)


# -- worker, gateway, dev ----------------------------------------------------------------


def _read_cert(path: str | None) -> bytes | None:
    if path is None:
        return None
    from asman.log.policy import check_cert

    data = Path(path).read_bytes()[:8192]
    try:
        check_cert(data)
    except ValueError as exc:
        raise InvalidInput(f"--cert {path}: {exc}; make one with `asman certify`") from None
    return data


def parse_gpus(value: str | None) -> tuple[str, ...]:
    """``--gpus 2`` → devices 0,1; ``--gpus 1,3`` or ``device=1,3`` → those devices."""
    if not value:
        return ()
    text = value.removeprefix("device=").strip()
    if text.isdigit():
        return tuple(str(i) for i in range(int(text)))
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices or not all(d.replace("-", "").isalnum() for d in devices):
        raise InvalidInput(f"--gpus {value!r}: give a count (2) or a device list (0,2)")
    return devices


@main.command()
@click.argument("queues", nargs=-1, required=True)
@click.option(
    "--slots",
    "--cpus",
    "slots",
    envvar="ASMAN_SLOTS",
    default=1,
    show_default=True,
    type=click.IntRange(1, 1024),
    help="Jobs run at once.",
)
@click.option(
    "--gpus",
    envvar="ASMAN_GPUS",
    default=None,
    help="GPUs to offer: a count (2) or device ids (0,2).",
)
@click.option(
    "--max-job-duration",
    envvar="ASMAN_MAX_JOB_DURATION",
    default="1h",
    show_default=True,
    help="Ceiling for every job's run time.",
)
@click.option(
    "--memory", envvar="ASMAN_MEMORY", default=None, help="Ceiling for every job's memory, e.g. 4g."
)
@click.option(
    "--data-dir",
    envvar="ASMAN_DATA_DIR",
    default=None,
    type=click.Path(file_okay=False),
    help="Job folders and the input cache [default: ~/.local/share/asman/worker].",
)
@click.option("--labels", envvar="ASMAN_LABELS", default="", help="Comma-separated labels.")
@click.option(
    "--network",
    envvar="ASMAN_NETWORK",
    type=click.Choice(["none", "bridge"]),
    default="none",
    show_default=True,
    help="Network for jobs (the owner's choice).",
)
@click.option("--once", envvar="ASMAN_ONCE", is_flag=True, help="Run one job, then exit.")
@click.option(
    "--drain-grace",
    envvar="ASMAN_DRAIN_GRACE",
    default="30s",
    show_default=True,
    help="On SIGTERM: time running jobs get before they are handed back.",
)
@click.option(
    "--allow-url",
    "allow_urls",
    envvar="ASMAN_ALLOW_URL",
    multiple=True,
    metavar="HOST",
    help="Let jobs' URLs and images reach HOST although it is loopback or private: a name, "
    "an address or a network (10.0.0.0/8), each with an optional :PORT; repeatable. "
    "[default: public addresses only]",
)
@click.option(
    "--procs",
    envvar="ASMAN_PROCS",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Worker processes, each with --slots slots, under one supervisor that restarts "
    "one that dies (one per core drains a busy queue fastest).",
)
@click.option(
    "--cpus-per-job",
    envvar="ASMAN_CPUS_PER_JOB",
    default=None,
    type=click.FloatRange(0.01, 4096),
    help="Ceiling for every job's CPUs. [default: the host's CPUs]",
)
@click.option(
    "--pids",
    envvar="ASMAN_PIDS",
    default=DEFAULT_PIDS,
    show_default=True,
    type=click.IntRange(16, 1_000_000),
    help="Ceiling for the processes of one job.",
)
@click.option(
    "--shm",
    envvar="ASMAN_SHM",
    default="64m",
    show_default=True,
    help="Ceiling for a job's /dev/shm (never above its memory).",
)
@click.option(
    "--tmp-size",
    envvar="ASMAN_TMP_SIZE",
    default="256m",
    show_default=True,
    help="Size of a job's /tmp (a tmpfs, counted in its memory).",
)
@click.option(
    "--max-output-bytes",
    envvar="ASMAN_MAX_OUTPUT_BYTES",
    default="10g",
    show_default=True,
    help="Ceiling for the bytes of one job's outputs.",
)
@click.option(
    "--max-outputs",
    envvar="ASMAN_MAX_OUTPUTS",
    default=DEFAULT_OUTPUT_FILES,
    show_default=True,
    type=click.IntRange(1, 1_000_000),
    help="Ceiling for the number of one job's output files.",
)
@click.option(
    "--max-log-bytes",
    envvar="ASMAN_MAX_LOG_BYTES",
    default="64m",
    show_default=True,
    help="Ceiling for the log kept of one job (the rest is counted, not kept).",
)
@click.option(
    "--cert",
    envvar="ASMAN_CERT",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A worker certificate (`asman certify`) for queues that trust its certifier.",
)
@log_options
def worker(
    queues: tuple[str, ...],
    slots: int,
    gpus: str | None,
    max_job_duration: str,
    memory: str | None,
    data_dir: str | None,
    labels: str,
    network: str,
    once: bool,
    drain_grace: str,
    allow_urls: tuple[str, ...],
    procs: int,
    cpus_per_job: float | None,
    pids: int,
    shm: str,
    tmp_size: str,
    max_output_bytes: str,
    max_outputs: int,
    max_log_bytes: str,
    cert: str | None,
    **kwargs: Any,
) -> None:
    """Join QUEUES and run their jobs in hardened containers."""
    from asman.peer.supervisor import Supervisor, serve_worker
    from asman.peer.worker import WorkerConfig

    settings = settings_from(kwargs, queues)
    config = WorkerConfig(
        queues=queues,
        data_dir=Path(data_dir) if data_dir else default_data_dir(os.environ) / "worker",
        slots=slots,
        gpus=parse_gpus(gpus),
        max_job_duration_s=parse_duration_ms(max_job_duration, "--max-job-duration") / 1000,
        memory_limit_bytes=parse_size_bytes(memory, "--memory") if memory else None,
        cpus_limit=cpus_per_job,
        pids_limit=pids,
        shm_limit_bytes=parse_size_bytes(shm, "--shm"),
        tmp_limit_bytes=parse_size_bytes(tmp_size, "--tmp-size"),
        max_output_bytes=parse_size_bytes(max_output_bytes, "--max-output-bytes"),
        max_outputs=max_outputs,
        total_log_limit=parse_size_bytes(max_log_bytes, "--max-log-bytes"),
        labels=tuple(x.strip() for x in labels.split(",") if x.strip()),
        network=network,
        once=once,
        drain_grace_s=parse_duration_ms(drain_grace, "--drain-grace") / 1000,
        allow_urls=allow_urls,
        procs=procs,
        cert=_read_cert(cert),
    )
    if procs > 1:
        root = click.get_current_context().find_root().params
        supervisor = Supervisor(
            settings,
            config,
            procs,
            verbose=root.get("verbose", 0),
            log_format=root.get("log_format", "text"),
        )

        async def supervise() -> int:
            stop = stop_on_signals()
            click.echo(
                f"worker on {', '.join(queues)}: {procs} processes of {slots} slot(s), "
                f"network {network}",
                err=True,
            )
            return await supervisor.run(stop)

        raise SystemExit(run_async(supervise()))

    async def serve() -> None:
        await serve_worker(
            settings, config, stop_on_signals(), announce=lambda line: click.echo(line, err=True)
        )

    run_async(serve())


@main.command()
@click.option(
    "--host",
    envvar="ASMAN_HTTP_HOST",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0 to serve other machines).",
)
@click.option(
    "--port", envvar="ASMAN_HTTP_PORT", default=8080, show_default=True, type=int, help="HTTP port."
)
@click.option(
    "--expose",
    envvar="ASMAN_EXPOSE",
    multiple=True,
    metavar="QUEUE",
    help="Let compute-queues' routes without a queue (/j/<id>/…) find jobs on QUEUE; "
    "repeatable or comma-separated. Whoever knows a job's definition can then find it and "
    "its outputs: expose only public queues. [default: none]",
)
@click.option(
    "--allow-url",
    "allow_urls",
    envvar="ASMAN_ALLOW_URL",
    multiple=True,
    metavar="HOST",
    help="Let the callbacks of jobs submitted here reach HOST although it is loopback or "
    "private: a name, an address or a network (10.0.0.0/8), each with an optional :PORT; "
    "repeatable. [default: public addresses only]",
)
@log_options
@asyncmain
async def gateway(
    host: str, port: int, expose: tuple[str, ...], allow_urls: tuple[str, ...], **kwargs: Any
) -> None:
    """Serve the browser page and the HTTP API."""
    from asman.dev import gateway_config, serve_gateway

    settings = settings_from(kwargs)
    exposed = tuple(dict.fromkeys(q.strip() for v in expose for q in v.split(",") if q.strip()))
    stop = stop_on_signals()
    await serve_gateway(
        gateway_config(settings, host, port, exposed_queues=exposed, allow_urls=allow_urls),
        stop,
        # once it listens and has the log: a refused start prints its error, not a URL
        ready=lambda: click.echo(f"gateway on http://{host}:{port}/", err=True),
    )


@main.command()
@click.option("--queue", default=None, help="Queue of the local worker [default: a new one, kept].")
@click.option(
    "--data-dir",
    envvar="ASMAN_DATA_DIR",
    default=None,
    type=click.Path(file_okay=False),
    help="[default: ~/.local/share/asman/dev]",
)
@click.option(
    "--nats-port",
    default=4222,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Client port of the local nats-server.",
)
@click.option(
    "--http-port",
    default=8080,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="Port of the gateway (the browser page).",
)
@click.option(
    "--slots",
    default=2,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Jobs the local worker runs at once.",
)
@click.option(
    "--allow-url",
    "allow_urls",
    envvar="ASMAN_ALLOW_URL",
    multiple=True,
    metavar="HOST",
    help="Besides its own services, let jobs' URLs and callbacks reach HOST although it is "
    "loopback or private (e.g. 127.0.0.1:9000 for a webhook receiver); repeatable.",
)
def dev(
    queue: str | None,
    data_dir: str | None,
    nats_port: int,
    http_port: int,
    slots: int,
    allow_urls: tuple[str, ...],
) -> None:
    """Everything on this machine: nats-server, object store, gateway and a worker."""
    from asman.dev import DevOptions, run_dev

    options = DevOptions(
        data_dir=Path(data_dir) if data_dir else default_data_dir(os.environ) / "dev",
        queue=queue,
        nats_port=nats_port,
        http_port=http_port,
        slots=slots,
        new_queue=new_queue_name,
        allow_urls=allow_urls,
    )
    raise SystemExit(run_async(run_dev(options)))


main.add_command(callout)  # asman callout init|serve (asman/cli/callout.py)


def entrypoint() -> None:
    try:
        default_map = config_default_map(main, config_file_data())
    except AsmanError as exc:
        click.echo(f"asman: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    main(default_map=default_map)


if __name__ == "__main__":
    entrypoint()
