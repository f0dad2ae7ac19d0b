"""``asman queue policy show|set``, ``asman queue trust|untrust`` and ``asman certify``:
queue policies (asman.log.policy) from the command line."""

from __future__ import annotations

import dataclasses
import datetime
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from asman.cli.options import asyncmain, emit_json, log_options, settings_from
from asman.errors import InvalidInput
from asman.log.definition import parse_duration_ms, parse_size_bytes
from asman.log.policy import Ceilings, Policy, PolicyView, keys_list

__all__ = ["certify", "policy_group", "trust", "untrust"]


def _keys_or_anyone(value: str, what: str) -> frozenset[str] | None:
    if value.strip().lower() == "anyone":
        return None
    if value.strip().lower() == "none":
        return frozenset()
    return frozenset(keys_list([v.strip() for v in value.split(",") if v.strip()], what))


def _none_or(value: str, parse: Callable[[str], int]) -> int | None:
    return None if value.strip().lower() in ("none", "") else parse(value)


def _short(keys: frozenset[str] | set[str] | None) -> str:
    if keys is None:
        return "anyone"
    if not keys:
        return "nobody"
    return ", ".join(k for k in sorted(keys))


def show_policy(queue: str, view: PolicyView | None) -> None:
    p = view.current if view else None
    if view is None:
        click.echo(f"queue {queue}: open (its name is not bound to an owner: no policy)")
        return
    if p is None:
        click.echo(f"queue {queue}: no policy yet (open until its owner writes one)")
        return
    when = (
        datetime.datetime.fromtimestamp(p.ts / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
        if p.ts
        else "?"
    )
    c = p.ceilings
    ceilings = [
        f"maxDuration {c.max_duration_ms // 1000}s" if c.max_duration_ms else "",
        f"memory {c.max_memory} bytes" if c.max_memory else "",
        f"cpus {c.max_millicpus / 1000:g}" if c.max_millicpus else "",
        f"gpus {c.max_gpus}" if c.max_gpus is not None else "",
        f"images {', '.join(c.images)}" if c.images is not None else "",
        "no network" if not c.network else "",
    ]
    rows = [
        ("policy", f"v{p.version}, written {when} UTC by {p.signer}"),
        ("owner", p.owner),
        ("admins", _short(set(p.admins) | {p.owner})),
        ("submit", _short(p.submitters)),
        ("workers", _short(p.workers)),
        ("certifiers", _short(p.certifiers) if p.certifiers else "none"),
        ("ceilings", "; ".join(x for x in ceilings if x) or "none"),
        ("lease ttl", f"{p.lease_ms / 1000:g}s" if p.lease_ms else "the deployment's"),
        ("retention", f"{p.retention_ms // 1000}s" if p.retention_ms else "the deployment's"),
    ]
    click.echo(f"queue {queue}")
    for name, value in rows:
        click.echo(f"  {name + ':':<12}{value}")


def _policy_json(queue: str, view: PolicyView | None) -> dict[str, Any]:
    p = view.current if view else None
    return {"queue": queue, "ownerBound": view is not None, "policy": p.to_json() if p else None}


async def _change(kwargs: dict[str, Any], queue: str, change: Callable[[Policy], Policy]) -> Policy:
    from asman.log import queues
    from asman.log.subjects import validate_queue
    from asman.peer.client import Client

    validate_queue(queue)
    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        me = client.peer_id

        def apply(current: Policy | None) -> Policy:
            return change(current or Policy.private(queue, me))

        return await queues.write_policy(client.log, queue, apply)


@click.group("policy")
def policy_group() -> None:
    """Show or change a queue's policy (queues made with `asman queue new --private`)."""


@policy_group.command("show")
@click.argument("queue")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def policy_show(queue: str, as_json: bool, **kwargs: Any) -> None:
    """Who may submit to QUEUE, whose results count, who administers it."""
    from asman.log import queues
    from asman.log.subjects import validate_queue
    from asman.peer.client import Client

    validate_queue(queue)
    async with Client.connect(settings_from(kwargs, (queue,))) as client:
        view = await queues.read_policy(client.log, queue)
    if as_json:
        emit_json(_policy_json(queue, view))
    else:
        show_policy(queue, view)


@policy_group.command("set")
@click.argument("queue")
@click.option("--submit", default=None, help="Who may submit: 'anyone', 'none' or KEY,KEY…")
@click.option("--submitter", multiple=True, help="Add a key that may submit.")
@click.option(
    "--workers",
    default=None,
    help="Whose results count: 'anyone', 'none' (only certified ones) or KEY,KEY…",
)
@click.option("--admin", multiple=True, help="Add an admin key (cancel anything, change this).")
@click.option("--remove-admin", multiple=True, help="Remove an admin key.")
@click.option("--certifier", multiple=True, help="Trust workers certified by this key.")
@click.option("--remove-certifier", multiple=True, help="Stop trusting this certifier.")
@click.option("--max-duration", default=None, help="Ceiling for maxDuration, e.g. 1h ('none').")
@click.option("--max-memory", default=None, help="Ceiling for requirements.memory ('none').")
@click.option("--max-cpus", default=None, help="Ceiling for requirements.cpus ('none').")
@click.option("--max-gpus", default=None, help="Ceiling for requirements.gpus ('none').")
@click.option("--image", multiple=True, help="Allowed image pattern (repeat); builds refused.")
@click.option("--any-image", is_flag=True, help="Allow every image, and builds.")
@click.option("--network/--no-network", default=None, help="Whether containers get a network.")
@click.option(
    "--queue-lease-ttl",
    "queue_lease_ttl",
    default=None,
    help="A challenged holder's grace, e.g. 30s ('none').",
)
@click.option(
    "--queue-retention",
    "queue_retention",
    default=None,
    help="How long jobs are listed, e.g. 7d ('none').",
)
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def policy_set(queue: str, as_json: bool, **kwargs: Any) -> None:
    """Write the next version of QUEUE's policy: what is not given stays as it is.

    Only the owner (the key the queue's name is bound to) writes the first version; then
    the owner and the admins. A private queue starts with only its owner submitting and
    working."""
    o = {k: kwargs.pop(k) for k in list(kwargs) if k in _SET_OPTIONS}
    if o["any_image"] and o["image"]:
        raise InvalidInput("give --image patterns or --any-image, not both")

    def change(p: Policy) -> Policy:
        submitters = p.submitters
        if o["submit"] is not None:
            submitters = _keys_or_anyone(o["submit"], "--submit")
        if o["submitter"]:
            submitters = (submitters or frozenset()) | set(keys_list(o["submitter"], "--submitter"))
        workers = p.workers if o["workers"] is None else _keys_or_anyone(o["workers"], "--workers")
        admins = (p.admins | set(keys_list(o["admin"], "--admin"))) - set(o["remove_admin"])
        certifiers = (p.certifiers | set(keys_list(o["certifier"], "--certifier"))) - set(
            o["remove_certifier"]
        )
        c = p.ceilings
        ceilings = Ceilings(
            max_duration_ms=c.max_duration_ms
            if o["max_duration"] is None
            else _none_or(o["max_duration"], lambda v: parse_duration_ms(v, "--max-duration")),
            max_memory=c.max_memory
            if o["max_memory"] is None
            else _none_or(o["max_memory"], lambda v: parse_size_bytes(v, "--max-memory")),
            max_millicpus=c.max_millicpus
            if o["max_cpus"] is None
            else _none_or(o["max_cpus"], lambda v: _millicpus(v)),
            max_gpus=c.max_gpus
            if o["max_gpus"] is None
            else _none_or(o["max_gpus"], lambda v: _count(v, "--max-gpus")),
            images=None if o["any_image"] else (tuple(o["image"]) if o["image"] else c.images),
            network=c.network if o["network"] is None else o["network"],
        )
        return dataclasses.replace(
            p,
            submitters=frozenset(submitters) if submitters is not None else None,
            workers=workers,
            admins=frozenset(admins),
            certifiers=frozenset(certifiers),
            ceilings=ceilings,
            lease_ms=p.lease_ms
            if o["queue_lease_ttl"] is None
            else _none_or(
                o["queue_lease_ttl"], lambda v: parse_duration_ms(v, "--queue-lease-ttl")
            ),
            retention_ms=p.retention_ms
            if o["queue_retention"] is None
            else _none_or(
                o["queue_retention"], lambda v: parse_duration_ms(v, "--queue-retention")
            ),
        )

    written = await _change(kwargs, queue, change)
    _done(queue, written, as_json)


_SET_OPTIONS = (
    "submit",
    "submitter",
    "workers",
    "admin",
    "remove_admin",
    "certifier",
    "remove_certifier",
    "max_duration",
    "max_memory",
    "max_cpus",
    "max_gpus",
    "image",
    "any_image",
    "network",
    "queue_lease_ttl",
    "queue_retention",
)


def _millicpus(value: str) -> int:
    try:
        cpus = float(value)
    except ValueError:
        cpus = -1.0
    if not 0 < cpus <= 1024:
        raise InvalidInput(f"--max-cpus {value!r}: give a number of CPUs above 0, e.g. 2 or 0.5")
    return max(1, round(cpus * 1000))


def _count(value: str, what: str) -> int:
    if not value.isdigit():
        raise InvalidInput(f"{what} {value!r}: give a whole number")
    return int(value)


def _done(queue: str, written: Policy, as_json: bool) -> None:
    if as_json:
        emit_json(_policy_json(queue, PolicyView(queue, (written,))))
    else:
        show_policy(queue, PolicyView(queue, (written,)))


@click.command("trust")
@click.argument("queue")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def trust(queue: str, key: str, as_json: bool, **kwargs: Any) -> None:
    """Count the claims and results of the worker KEY on QUEUE (`asman keys` on the
    worker's machine prints its key)."""
    (worker,) = keys_list([key], "KEY")

    def change(p: Policy) -> Policy:
        return dataclasses.replace(p, workers=(p.workers or frozenset()) | {worker})

    _done(queue, await _change(kwargs, queue, change), as_json)


@click.command("untrust")
@click.argument("queue")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True)
@log_options
@asyncmain
async def untrust(queue: str, key: str, as_json: bool, **kwargs: Any) -> None:
    """Stop counting the worker KEY on QUEUE: a job it runs now goes back to the queue."""
    (worker,) = keys_list([key], "KEY")

    def change(p: Policy) -> Policy:
        if p.workers is None:
            raise InvalidInput(
                f"queue {queue} counts any worker's results: list the ones to trust with "
                f"`asman queue policy set {queue} --workers KEY,KEY`"
            )
        return dataclasses.replace(p, workers=p.workers - {worker})

    _done(queue, await _change(kwargs, queue, change), as_json)


@click.command("certify")
@click.argument("worker")
@click.option("--for", "valid_for", default="30d", show_default=True, help="How long it holds.")
@click.option("--queue", default=None, help="Only for this queue [default: any queue].")
@click.option("--key-file", envvar="ASMAN_KEY_FILE", default=None, type=click.Path(dir_okay=False))
@click.option(
    "--out", "-o", default="-", type=click.Path(dir_okay=False), help="File [default: stdout]."
)
def certify(worker: str, valid_for: str, queue: str | None, key_file: str | None, out: str) -> None:
    """Certify, with this key (an institution's), that WORKER is one of its workers: queues
    whose policy trusts this key (`--certifier`) count its results. The worker runs with
    `asman worker --cert FILE`."""
    import os

    from asman.config import default_config_dir
    from asman.errors import AsmanError
    from asman.log.events import now_ms
    from asman.log.keys import PeerKey
    from asman.log.policy import make_cert

    try:
        (worker_id,) = keys_list([worker], "WORKER")
        until = now_ms() + parse_duration_ms(valid_for, "--for")
        path = Path(key_file) if key_file else default_config_dir(os.environ) / "peer.key"
        cert = make_cert(PeerKey.load_or_create(path), worker_id, until, queue)
    except AsmanError as exc:
        click.echo(f"asman: {exc}", err=True)
        raise SystemExit(exc.exit_code) from None
    if out == "-":
        sys.stdout.buffer.write(cert)
    else:
        Path(out).write_bytes(cert)
        click.echo(f"certificate for {worker_id[:12]}… written to {out}", err=True)
