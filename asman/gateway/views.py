"""JSON shapes the gateway answers with: Asman's own (camelCase) and compute-queues'.

Everything here is pure: a ``JobState`` (the fold of the job's events) and the queue's
heartbeats in, plain JSON-ready dicts out. ``base`` is the URL prefix of the job's routes
(``/api/v1/queues/<q>/jobs/<id>``) so views can link outputs and streams.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict
from urllib.parse import quote

from asman.errors import InvalidDefinition
from asman.log.definition import parse_size_bytes
from asman.log.events import Blob, JobState, Result
from asman.log.jobs import tags_asked
from asman.log.logstream import LogChunk
from asman.log.workers import WorkerInfo

__all__ = [
    "Waiting",
    "chunk_view",
    "cq_listed",
    "cq_record",
    "cq_result",
    "job_summary",
    "job_view",
    "result_view",
    "waiting",
    "worker_view",
]


class Waiting(TypedDict):
    """Why a queued job has not started: a stable ``code`` and a sentence for people."""

    code: str
    message: str


def _blob_view(blob: Blob) -> dict[str, Any]:
    return {"size": blob.size, "sha256": blob.sha256, "inline": blob.data is not None}


def result_view(result: Result, base: str) -> dict[str, Any]:
    return {
        "reason": result.reason,
        "exitCode": result.exit_code,
        "oomKilled": result.oom_killed,
        "durationMs": result.duration_ms,
        "message": result.message,
        "worker": result.worker,
        "trustedWorker": result.vetted,
        "attempt": result.attempt,
        "finishedMs": result.finished_ms,
        "replacedBy": result.replaced_by,
        "outputs": [
            {"path": f.path, **_blob_view(f.blob), "url": f"{base}/outputs/{_quote_path(f.path)}"}
            for f in result.outputs
        ],
        "log": _blob_view(result.log) if result.log is not None else None,
    }


def _quote_path(path: str) -> str:
    return quote(path, safe="/")


def _requirements(state: JobState) -> tuple[int, int | None]:
    req = state.definition.get("requirements")
    if not isinstance(req, Mapping):
        return 0, None
    gpus = req.get("gpus")
    memory: int | None = None
    if req.get("memory") is not None:
        try:
            memory = parse_size_bytes(req["memory"], "requirements.memory")
        except InvalidDefinition:
            memory = None
    return (
        int(gpus) if isinstance(gpus, int | float) and not isinstance(gpus, bool) else 0
    ), memory


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def waiting(state: JobState, workers: Sequence[WorkerInfo]) -> Waiting | None:
    """Why a queued job waits, judged from the queue's live heartbeats. None unless queued."""
    if state.state != "queued":
        return None
    q = state.queue
    if not workers:
        return {
            "code": "no_workers",
            "message": f"no worker is online on queue {q!r}: start one with `asman worker {q}`",
        }
    live = [w for w in workers if not w.draining]
    if not live:
        return {
            "code": "workers_draining",
            "message": f"the {len(workers)} workers of queue {q!r} are shutting down",
        }
    gpus, memory = _requirements(state)
    fit = live
    if gpus > 0:
        fit = [w for w in live if w.gpus >= gpus]
        if not fit:
            most = max(w.gpus for w in live)
            return {
                "code": "no_worker_with_gpus",
                "message": f"the job asks for {gpus} GPUs; no worker online has that many "
                f"(most: {most})",
            }
    if memory is not None:
        # a worker without a memory ceiling (0) runs the job with the memory it asks for
        fit = [w for w in fit if w.memory_bytes == 0 or w.memory_bytes >= memory]
        if not fit:
            most = max(w.memory_bytes for w in live)
            return {
                "code": "no_worker_with_memory",
                "message": f"the job asks for {_size(memory)} of memory; no worker online "
                f"allows that much (most: {_size(most)})",
            }
    tags = tags_asked(state.definition)  # as the workers read them
    if tags:
        fit = [w for w in fit if set(tags) <= set(w.labels)]
        if not fit:
            labels = {label for w in live for label in w.labels}
            missing = [t for t in tags if t not in labels]
            told = ", ".join(missing) if missing else ", ".join(tags)
            return {
                "code": "no_worker_with_tags",
                "message": (
                    f"the job is tagged {told}; no worker online has "
                    + ("that label" if len(missing) == 1 else "those labels")
                    if missing
                    else f"the job is tagged {told}; no worker online has all of them"
                ),
            }
    if all(w.free_slots <= 0 or (gpus > 0 and w.free_gpus < gpus) for w in fit):
        return {
            "code": "workers_busy",
            "message": f"all {len(fit)} workers that can run it are busy; it starts when a "
            "slot frees up",
        }
    return {
        "code": "dispatching",
        "message": f"{len(fit)} workers can run it; waiting for one to claim it",
    }


def job_view(
    state: JobState,
    base: str,
    *,
    workers: Sequence[WorkerInfo] | None = None,
    definition: bool = True,
    history: bool = True,
) -> dict[str, Any]:
    """The job as the native API shows it."""
    cq_state, cq_reason = state.cq_state
    lease = state.lease
    view: dict[str, Any] = {
        "queue": state.queue,
        "jobId": state.job_id,
        "state": state.state,
        "reason": state.reason,
        "tesState": state.tes_state,
        "cqState": cq_state,
        "cqFinishedReason": cq_reason,
        "submittedMs": state.submitted_ms,
        "startedMs": state.started_ms,
        "finishedMs": state.result.finished_ms if state.result else None,
        "attempts": state.claims,
        "worker": lease.worker if lease else (state.result.worker if state.result else None),
        "cancelRequested": state.cancel_requested,
        "namespaces": list(state.namespaces),
        "submitter": state.submitter,
        "via": state.via,
        "class": state.job_class,
        "seq": state.last_seq,
        "control": state.control,
        "result": result_view(state.result, base) if state.result else None,
        "waiting": waiting(state, workers) if workers is not None else None,
        "links": {
            "self": base,
            "events": f"{base}/events",
            "logs": f"{base}/logs",
            "cancel": f"{base}/cancel",
        },
    }
    if definition:
        view["definition"] = state.definition
    if history:
        view["history"] = [
            {
                "seq": h.seq,
                "type": h.type,
                "signer": h.signer,
                "ts": h.ts,
                "accepted": h.accepted,
                "note": h.note,
            }
            for h in state.history
        ]
    return view


def job_summary(state: JobState) -> dict[str, Any]:
    """One line of a queue listing (no definition, no outputs)."""
    cq_state, cq_reason = state.cq_state
    result = state.result
    return {
        "jobId": state.job_id,
        "state": state.state,
        "reason": state.reason,
        "cqState": cq_state,
        "cqFinishedReason": cq_reason,
        "submittedMs": state.submitted_ms,
        "startedMs": state.started_ms,
        "finishedMs": result.finished_ms if result else None,
        "exitCode": result.exit_code if result else None,
        "worker": state.lease.worker if state.lease else (result.worker if result else None),
        "attempts": state.claims,
        "namespaces": list(state.namespaces),
        "seq": state.last_seq,
    }


def worker_view(w: WorkerInfo) -> dict[str, Any]:
    return {
        "workerId": w.worker_id,
        "slots": w.slots,
        "freeSlots": w.free_slots,
        "gpus": w.gpus,
        "freeGpus": w.free_gpus,
        "memoryBytes": w.memory_bytes,
        "maxJobDurationMs": w.max_job_duration_ms,
        "labels": list(w.labels),
        "running": list(w.running),
        "version": w.version,
        "hostname": w.hostname,
        "network": w.network,
        "draining": w.draining,
        "heartbeatMs": w.ts,
    }


def chunk_view(chunk: LogChunk) -> dict[str, Any]:
    return {
        "seq": chunk.seq,
        "attempt": chunk.attempt,
        "stream": chunk.stream,
        "ts": chunk.ts,
        "text": chunk.data.decode("utf-8", errors="replace"),
    }


# -- compute-queues shapes (reference/compute-queues.md §3.1, §4.1) -----------------------------

#: finished reasons compute-queues leaves out of listings (``isJobOkForSending``)
CQ_HIDDEN = frozenset({"WorkerLost", "JobReplacedByClient", "Cancelled", "Deleted"})


def cq_listed(state: JobState, now_ms: int, finished_listed_ms: int) -> bool:
    """Whether compute-queues' listings show the job: not one it hides (cancelled,
    replaced, worker lost), and a finished one only until ``finished_listed_ms`` after it
    finished (compute-queues' ``MAX_TIME_FINISHED_JOB_IN_QUEUE``, 60 s)."""
    if state.result is None:
        return True
    if state.cq_state[1] in CQ_HIDDEN:
        return False
    return now_ms - state.result.finished_ms <= finished_listed_ms


def _last_change_ms(state: JobState) -> int:
    if state.result:
        return state.result.finished_ms
    if state.lease:
        return state.started_ms or state.lease.claimed_ms or state.submitted_ms
    return state.submitted_ms


def cq_result(
    state: JobState, blob_url: str, logs: Sequence[LogChunk] | None = None
) -> dict[str, Any] | None:
    """``DockerRunResultWithOutputs``: outputs as DataRefs (inline base64, or a url ref to
    ``<blob_url>/<sha256>``), logs as ``[text, ts, isStderr]``."""
    result = state.result
    if result is None:
        return None
    outputs: dict[str, Any] = {}
    for f in result.outputs:
        if f.blob.data is not None:
            outputs[f.path] = {"type": "base64", "value": base64.b64encode(f.blob.data).decode()}
        else:
            outputs[f.path] = {
                "type": "url",
                "value": f"{blob_url}/{f.blob.sha256}",
                "hash": f.blob.sha256,
            }
    out: dict[str, Any] = {
        "StatusCode": result.exit_code,
        "duration": result.duration_ms,
        "isTimedOut": result.reason == "timed_out",
        "outputs": outputs,
        "logs": [
            [c.data.decode("utf-8", errors="replace"), c.ts, True]
            if c.stream == "stderr"
            else [c.data.decode("utf-8", errors="replace"), c.ts]
            for c in (logs or ())
            if c.stream in ("stdout", "stderr")
        ],
    }
    if result.reason in ("error", "worker_lost", "cancelled") and result.message:
        out["error"] = result.message
    return out


def cq_record(
    state: JobState,
    *,
    blob_url: str = "",
    with_result: bool = False,
    logs: Sequence[LogChunk] | None = None,
) -> dict[str, Any]:
    """``InMemoryDockerJob``: ``{queuedTime, state, time, worker, namespaces, finished?,
    finishedReason?}``; ``finished`` carries the result only when ``with_result``."""
    cq_state, cq_reason = state.cq_state
    record: dict[str, Any] = {
        "queuedTime": state.submitted_ms,
        "state": cq_state,
        "time": _last_change_ms(state),
        "worker": (state.lease.worker if state.lease else "")
        or (state.result.worker if state.result else ""),
        "namespaces": list(state.namespaces),
    }
    req = state.definition.get("requirements")
    if isinstance(req, Mapping):
        record["requirements"] = dict(req)
    tags = state.definition.get("tags")
    if isinstance(tags, list):
        record["tags"] = list(tags)
    if state.result is not None:
        record["finishedReason"] = cq_reason
        finished: dict[str, Any] = {
            "type": "Finished",
            "time": state.result.finished_ms,
            "reason": cq_reason,
            "worker": state.result.worker,
        }
        if state.result.message:
            finished["message"] = state.result.message
        if with_result:
            finished["result"] = cq_result(state, blob_url, logs)
        record["finished"] = finished
    return record
