"""A wire-v1 log written as Asman 0.1 wrote it, for the upgrade tests: ``ASMAN_JOBS`` without
a wire version in its metadata, v1 envelopes (``v: 1``, no ``prev``), the ``ASMAN_PENDING`` work
queue with a durable consumer per (queue, class), and heartbeats in a KV bucket."""

from __future__ import annotations

import json

import nats
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from asman.log import subjects, wire
from asman.log.definition import job_id
from asman.log.keys import PeerKey

QUEUE = "old"
WAITING = {"image": "asman/busybox:local", "command": "echo waiting"}
RUNNING = {"image": "asman/busybox:local", "command": "echo running"}
DONE = {"image": "asman/busybox:local", "command": "echo done"}


async def write_v1_log(url: str) -> None:
    submitter, worker = PeerKey.generate(), PeerKey.generate()
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=subjects.JOBS_STREAM,
            subjects=["asman.job.*.*"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            allow_direct=True,
        )
    )
    await js.add_stream(
        StreamConfig(
            name=subjects.V1_PENDING_STREAM,
            subjects=["asman.pending.*.*.*"],
            retention=RetentionPolicy.WORK_QUEUE,
            max_msgs_per_subject=1,
            discard=DiscardPolicy.NEW,
            discard_new_per_subject=True,
        )
    )
    await js.create_key_value(KeyValueConfig(bucket="ASMAN_WORKERS", ttl=30))
    await js.add_consumer(
        subjects.V1_PENDING_STREAM,
        ConsumerConfig(
            durable_name="asman_old_cpu",
            filter_subject="asman.pending.old.cpu.*",
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )

    async def v1(key: PeerKey, definition: dict[str, str], event: dict[str, object]) -> None:
        subject = subjects.job_subject("old", job_id(definition))
        await js.publish(subject, wire.seal(key, subject, {"v": 1, "ts": 1, **event}))

    for definition in (WAITING, RUNNING, DONE):
        submitted = {"type": "submitted", "definition": json.dumps(definition), "class": "cpu"}
        await v1(submitter, definition, submitted)
    await js.publish(f"asman.pending.old.cpu.{job_id(WAITING)}", job_id(WAITING).encode())
    claim = {"type": "claimed", "lease_ms": 30000, "ticket_seq": 1, "delivered": 1}
    await v1(worker, RUNNING, claim)
    await v1(worker, DONE, claim)
    await v1(worker, DONE, {"type": "finished", "reason": "success", "attempt": 1})
    await nc.close()
