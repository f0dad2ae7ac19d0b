"""Reads whose subject filter the server can check against a user's permissions.

The default read (batched direct get, ``Log.read_subject``) carries its subject filter in the
request *payload*: a user allowed to direct-get a stream can read, and enumerate, every subject
in it. That is fine inside one trust domain and wrong for a credential limited to one queue
(deploy/nats/accounts). This module reads the same messages through a short-lived consumer
whose filter is part of the API *subject*::

    $JS.API.CONSUMER.CREATE.<stream>.<random name>.<filter>

The server refuses a create whose payload filter differs from the subject's, so a permission
such as ``$JS.API.CONSUMER.CREATE.ASMAN_JOBS.*.asman.job.alpha.*`` confines the user to queue
``alpha``. The consumer is ephemeral (in memory, one replica, acks off), is pulled until it
has nothing pending, and is deleted; an abandoned one expires after its inactive threshold.

Cost: three round trips (create, pull, delete) instead of one, and the create goes through
the JetStream meta leader. ``LogConfig(reads="consumer")`` selects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from asman.errors import LogError
from asman.log.events import RawEvent

__all__ = ["BATCH", "read_filtered"]

BATCH = 256
SETUP_RETRIES = 10


async def read_filtered(
    js: JetStreamContext,
    stream: str,
    subject: str,
    start_seq: int,
    timeout: float,
    max_bytes: int | None = None,
    max_messages: int | None = None,
) -> list[RawEvent]:
    """Every message of ``stream`` on ``subject`` (wildcards allowed) from ``start_seq``,
    with the server's timestamps; with ``max_bytes``, stops after the batch that passes it.

    nats errors propagate: the caller translates them (``translate_errors``).
    """
    name = "r" + secrets.token_hex(12)  # unguessable: nobody else can pull or delete it
    config = ConsumerConfig(
        name=name,
        filter_subject=subject,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=max(5.0, 2 * timeout),
        mem_storage=True,
        num_replicas=1,
    )
    info = await js.add_consumer(stream, config, timeout=timeout)
    pending = int(info.num_pending or 0)
    out: list[RawEvent] = []
    total = 0
    if pending == 0:
        await _delete(js, stream, name)
        return out
    sub = await js.pull_subscribe_bind(durable=name, stream=stream)
    try:
        while pending > 0:
            msgs = await _fetch(sub, min(pending, BATCH), timeout, subject, pending)
            for msg in msgs:
                md = msg.metadata
                ts = _stamp_ms(msg.reply)
                out.append(
                    RawEvent(seq=md.sequence.stream, data=msg.data, subject=msg.subject, ts=ts)
                )
                total += len(msg.data)
                pending = md.num_pending
            if max_bytes is not None and total > max_bytes:
                break
            if max_messages is not None and len(out) >= max_messages:
                break
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        await _delete(js, stream, name)
    return out


def _stamp_ms(reply: str | None) -> int | None:
    """The server's time (ms) of a delivered message, from its ack subject: the same integer
    a direct get's ``Nats-Time-Stamp`` gives (no float on the way)."""
    tokens = (reply or "").split(".")
    if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>
        raw = tokens[7]
    elif len(tokens) >= 11:  # with domain and account hash
        raw = tokens[9]
    else:
        return None
    return int(raw) // 1_000_000 if raw.isdigit() else None


async def _fetch(
    sub: JetStreamContext.PullSubscription, batch: int, timeout: float, subject: str, pending: int
) -> list[Msg]:
    """In a cluster the new consumer may not serve pulls yet on the server we reach (503 or
    no responders for a few milliseconds): try again shortly."""
    for attempt in range(SETUP_RETRIES):
        try:
            return await sub.fetch(batch=batch, timeout=timeout)
        except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
            if attempt == SETUP_RETRIES - 1:
                raise
            await asyncio.sleep(0.02 * (attempt + 1))
        except nats.errors.TimeoutError:
            raise LogError(
                f"reading {subject}: {pending} message(s) announced, none delivered in time"
            ) from None
    raise AssertionError("unreachable")


async def _delete(js: JetStreamContext, stream: str, name: str) -> None:
    """Best effort: the inactive threshold removes the consumer anyway."""
    with contextlib.suppress(Exception):
        await js.delete_consumer(stream, name)
