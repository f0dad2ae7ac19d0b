"""Worker heartbeats in the ``ASMAN_WORKERS`` bucket (one key per queue and worker).

The bucket's TTL removes a worker that stopped beating; a draining worker deletes its keys.
Each value is a signed envelope whose subject is the key, so nobody can announce a worker
under another worker's id.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from asman.errors import EnvelopeError
from asman.log import subjects, wire
from asman.log.connection import Log, translate_errors
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


def _kv_subject(key: str) -> str:
    return f"$KV.{subjects.WORKERS_BUCKET}.{key}"


async def beat(log: Log, info: WorkerInfo) -> None:
    """Write (or refresh) this worker process's heartbeat for ``info.queue``."""
    key = subjects.worker_key(info.queue, log.peer_id, log.session)
    body = {"type": "worker", **info.to_wire(), "proc": log.session, "ts": now_ms()}
    data = wire.seal(log.key, _kv_subject(key), body)
    kv = await log.workers_kv()
    with translate_errors(f"writing heartbeat {key}"):
        await kv.put(key, data)


async def remove(log: Log, queue: str) -> None:
    """Delete this worker process's heartbeat for ``queue`` (on a clean stop)."""
    key = subjects.worker_key(queue, log.peer_id, log.session)
    kv = await log.workers_kv()
    with translate_errors(f"removing heartbeat {key}"):
        await kv.delete(key)


async def list_workers(log: Log, queue: str) -> list[WorkerInfo]:
    """Workers whose heartbeat for ``queue`` is live, verified, sorted by id."""
    stream = f"KV_{subjects.WORKERS_BUCKET}"
    raw = await log.read_subject(stream, _kv_subject(subjects.workers_filter(queue)))
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
