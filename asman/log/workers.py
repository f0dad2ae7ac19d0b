"""Worker heartbeats in the ``ASMAN_WORKERS`` stream (one subject per queue and worker
process, the last message kept).

The stream's ``max_age`` removes a worker that stopped beating; a draining worker replaces its
heartbeats with empty messages that expire at once. Each heartbeat is a signed envelope whose
subject names the worker, so nobody can announce a worker under another worker's id. A plain
stream, not a KV bucket: its subjects cross a leaf node like every other Asman subject (KV
puts from a leaf do not reach the hub), so the hub sees the leaf's workers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from asman.errors import EnvelopeError
from asman.log import subjects, wire
from asman.log.connection import DONE_TTL, Log
from asman.log.events import now_ms

__all__ = ["WorkerInfo", "beat", "list_workers", "remove"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker announces about itself."""

    worker_id: str
    queue: str
    slots: int
    free_slots: int
    gpus: int = 0
    free_gpus: int = 0
    memory_bytes: int = 0
    max_job_duration_ms: int = 0
    labels: tuple[str, ...] = ()
    running: tuple[str, ...] = ()
    version: str = ""
    hostname: str = ""
    network: str = "none"
    ts: int = 0
    draining: bool = False
    #: the process under the worker's key (several processes may share a key)
    proc: str = ""
    #: the server's time of the heartbeat message (set by ``list_workers``)
    seen_ms: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("extra")
        out.pop("seen_ms")
        out["labels"] = list(self.labels)
        out["running"] = list(self.running)
        return out

    @classmethod
    def from_wire(cls, signer: str, obj: dict[str, Any]) -> WorkerInfo:
        def num(key: str) -> int:
            value = obj.get(key, 0)
            return value if isinstance(value, int) and not isinstance(value, bool) else 0

        def texts(key: str) -> tuple[str, ...]:
            value = obj.get(key, [])
            return tuple(v for v in value if isinstance(v, str)) if isinstance(value, list) else ()

        proc = obj.get("proc", "")
        return cls(
            worker_id=signer,
            queue=str(obj.get("queue", "")),
            proc=proc if isinstance(proc, str) else "",
            slots=num("slots"),
            free_slots=num("free_slots"),
            gpus=num("gpus"),
            free_gpus=num("free_gpus"),
            memory_bytes=num("memory_bytes"),
            max_job_duration_ms=num("max_job_duration_ms"),
            labels=texts("labels"),
            running=texts("running"),
            version=str(obj.get("version", "")),
            hostname=str(obj.get("hostname", "")),
            network=str(obj.get("network", "none")),
            ts=num("ts"),
            draining=bool(obj.get("draining", False)),
        )


async def beat(log: Log, info: WorkerInfo) -> None:
    """Write (or refresh) this worker process's heartbeat for ``info.queue``."""
    subject = subjects.worker_subject(info.queue, log.peer_id, log.session)
    body = {"type": "worker", **info.to_wire(), "proc": log.session, "ts": now_ms()}
    await log.publish_entry(subject, wire.seal(log.key, subject, body))


async def remove(log: Log, queue: str) -> None:
    """Remove this worker process's heartbeat for ``queue`` (on a clean stop): an empty
    message replaces it and expires at once."""
    subject = subjects.worker_subject(queue, log.peer_id, log.session)
    await log.publish_entry(subject, b"", ttl=DONE_TTL)


async def list_workers(log: Log, queue: str) -> list[WorkerInfo]:
    """Workers whose heartbeat for ``queue`` is live, verified, sorted by id."""
    raw = await log.read_subject(subjects.WORKERS_STREAM, subjects.workers_filter(queue))
    latest = {ev.subject: ev for ev in raw}
    out = []
    for subject, ev in latest.items():
        if not ev.data:
            continue  # a delete marker
        try:
            opened = wire.open_envelope(ev.data, subject)
        except EnvelopeError as exc:
            logger.warning("ignoring heartbeat on %s: %s", subject, exc)
            continue
        info = WorkerInfo.from_wire(opened.signer, opened.event)
        if not subject.endswith(f".{opened.signer}.{info.proc}"):
            logger.warning("ignoring heartbeat on %s signed by %s", subject, opened.signer[:12])
            continue
        out.append(replace(info, seen_ms=ev.ts))
    out.sort(key=lambda w: (w.worker_id, w.proc))
    return out
