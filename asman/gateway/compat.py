"""compute-queues' HTTP routes and shapes (reference/compute-queues.md §4.1), so its clients
can point at an Asman gateway.

Differences, on purpose:

* A job is found by its queue. ``/j/{id}`` routes take the queue from ``?queue=``; without it
  they look for the id on the queues the operator exposes (``GatewayConfig.exposed_queues``,
  all read at once, the first in the configured order that holds it wins), and with none
  exposed they answer 400 saying how to expose some. Queue names are capabilities, so no
  other queue is searched. A browser opening ``/j/{id}`` (the short link form,
  ``/j/{id}#?queue=q``) gets the page, which reads the queue from the hash.
* An unknown job's ``definition.json`` and ``result.json`` answer 200 ``{"data": null}``, as
  compute-queues does; the other job routes answer 404 ``job_not_found``.
* Namespaces (``control.namespace``; ``?namespace=`` or the path of a cancel) are
  compute-queues' (``asman.log.namespaces``), held by this gateway's key: a cancel removes
  what this gateway added (or anything, on jobs it submitted). A cancel that leaves other
  namespaces answers at once (compute-queues loops until the job finishes), one naming a
  namespace that does not hold the job is 400, and the path's namespace counts
  (compute-queues reads only the query).
* Listings (``GET /q/<queue>``, ``status``) are compute-queues' views: cancelled, replaced
  and lost jobs are hidden, finished ones drop out ``cq_finished_listed_s`` (60 s) after
  they finish. Asman's ``/api/v1`` listings keep every job. A non-zero exit code is
  ``Success`` with its ``StatusCode``, as in compute-queues (Asman's own reason is ``failed``).
* The client-supplied ``id`` of a submission is ignored; the answer carries the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from asman.errors import InvalidInput, JobNotFound, LogError
from asman.gateway import api, files, sse
from asman.gateway.limits import read_json
from asman.gateway.page import page
from asman.gateway.state import BLOBS, CONFIG, FOLLOWERS, LOG
from asman.gateway.views import cq_listed, cq_record, worker_view
from asman.log import jobs, subjects
from asman.log.events import DEFAULT_NAMESPACE, JobState, now_ms, validate_namespace
from asman.log.logstream import read_logs
from asman.log.workers import list_workers

__all__ = ["add_routes"]

MAX_LISTED = 1000
RUN_STREAMS = ("stdout", "stderr")
BUILD_STREAMS = ("build", "system")


class NotExposed(JobNotFound):
    """No queue this gateway exposes holds the job (a route without a queue). Answered 404
    ``job_not_found`` like ``JobNotFound``, without naming the queues looked at."""

    def __init__(self, job_id: str) -> None:
        LogError.__init__(
            self,
            f"job {job_id} not found on the queues this gateway exposes: if it is on another "
            "queue, use /q/<queue>/j/<id>/… or add ?queue=<queue>",
        )
        self.queue = ""
        self.job_id = job_id


def _has_queue(request: web.Request) -> bool:
    return "queue" in request.match_info or bool(request.query.get("queue"))


def _queue(request: web.Request) -> str:
    if not _has_queue(request):
        raise InvalidInput(
            "this route needs the job's queue: use /q/<queue>/j/<id>/… or add ?queue=<queue> "
            "(a job is found by its queue and id)"
        )
    return api.queue_param(request)


async def _find(request: web.Request) -> tuple[str, JobState | None]:
    """The job's id and state (None: no such job). Its queue is the path's or ``?queue=``;
    without one, the exposed queues are read at once and the first (in the configured order)
    that holds the id wins."""
    if _has_queue(request):
        queue, jid = _queue(request), _job(request)
        return jid, await jobs.read_job(request.app[LOG], queue, jid)
    exposed = request.app[CONFIG].exposed_queues
    if not exposed:
        raise InvalidInput(
            "this route needs the job's queue: use /q/<queue>/j/<id>/… or add ?queue=<queue>. "
            "This gateway exposes no queue for lookups by id alone; its operator can name "
            "some with `asman gateway --expose QUEUE` (or ASMAN_EXPOSE)"
        )
    jid, log = _job(request), request.app[LOG]
    try:
        async with asyncio.TaskGroup() as tg:
            reads = [tg.create_task(jobs.read_job(log, queue, jid)) for queue in exposed]
    except ExceptionGroup as group:
        raise group.exceptions[0] from None  # e.g. LogUnavailable, answered as such
    for read in reads:
        if (state := read.result()) is not None:
            return jid, state
    return jid, None


async def _load(request: web.Request) -> JobState:
    """The job as ``_find`` finds it; JobNotFound (404) when there is none."""
    jid, state = await _find(request)
    if state is not None:
        return state
    if _has_queue(request):
        raise JobNotFound(_queue(request), jid)
    raise NotExposed(jid)


def _job(request: web.Request) -> str:
    raw = request.match_info["job"]
    return subjects.validate_job_id(raw.removesuffix(".json"))


def _blob_url(request: web.Request) -> str:
    return f"{api.public_base(request)}/f"


async def _logs(request: web.Request, state: JobState) -> list[Any]:
    chunks, cursor = await read_logs(request.app[LOG], state, 1)
    budget = request.app[CONFIG].limits.max_log_response_bytes
    kept, _, _ = api.bounded_logs(chunks, cursor, budget)
    return kept


async def submit(request: web.Request) -> web.Response:
    queue = api.queue_param(request)
    body = await read_json(request, request.app[CONFIG].limits.max_body_bytes)
    if isinstance(body, dict) and isinstance(body.get("enqueued"), Mapping):
        body = body["enqueued"]  # StateChangeValueQueued {type, time, enqueued: EnqueueJob}
    control = None
    if isinstance(body, dict) and isinstance(body.get("definition"), Mapping):
        definition = body["definition"]  # EnqueueJob {id?, definition, debug?, control?}
        control = body.get("control")  # its namespace holds the job; its callbacks go with it
    else:
        definition = body
    submitted = await api.submit_definition(request, queue, definition, control=control)
    cq_state, cq_reason = submitted.state.cq_state
    return web.json_response(
        {
            "success": True,
            "jobId": submitted.job_id,
            "state": cq_state,
            "finishedReason": cq_reason,
            "cached": submitted.cached,
        }
    )


async def _listed(request: web.Request, queue: str) -> list[JobState]:
    """The queue's jobs as compute-queues lists them (``cq_listed``), the newest
    ``MAX_LISTED``."""
    states = await jobs.list_jobs(request.app[LOG], queue)
    window_ms = int(request.app[CONFIG].cq_finished_listed_s * 1000)
    now = now_ms()
    return [s for s in states if cq_listed(s, now, window_ms)][-MAX_LISTED:]


async def list_queue(request: web.Request) -> web.Response:
    queue = api.queue_param(request)
    states = await _listed(request, queue)
    return web.json_response({"data": {s.job_id: cq_record(s) for s in states}})


async def status(request: web.Request) -> web.Response:
    queue = api.queue_param(request)
    log = request.app[LOG]
    states = await _listed(request, queue)
    workers = await list_workers(log, queue)
    active = [s for s in states if not s.finished]
    return web.json_response(
        {
            "jobs": {
                s.job_id: {"state": s.cq_state[0], "finishedReason": s.cq_state[1]} for s in states
            },
            "otherServers": [],
            "localWorkers": [worker_view(w) for w in workers],
            "clientCount": 0,
            "queueInfo": {
                "address": api.public_base(request),
                "serverId": log.peer_id,
                "jobCount": len(active),
                "localWorkerCount": len(workers),
                "otherWorkerCount": 0,
                "clientCount": 0,
                "jobStates": {
                    name: sum(1 for s in states if s.cq_state[0] == name)
                    for name in ("Queued", "Running", "Finished")
                },
            },
        }
    )


async def job(request: web.Request) -> web.StreamResponse:
    if (
        "queue" not in request.match_info
        and not request.query.get("queue")
        and not request.match_info["job"].endswith(".json")
        and _wants_html(request)
    ):
        return await page(request)  # the short link /j/<id>#?queue=<q> is the page
    state = await _load(request)
    logs = await _logs(request, state) if state.finished else None
    record = cq_record(state, blob_url=_blob_url(request), with_result=True, logs=logs)
    # ``queue`` is Asman's: a lookup by id alone says where the job was found
    return web.json_response(
        {"data": {"definition": state.definition, "results": record, "queue": state.queue}}
    )


def _wants_html(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and "application/json" not in accept


async def definition(request: web.Request) -> web.Response:
    _, state = await _find(request)
    return web.json_response({"data": state.definition if state is not None else None})


async def result(request: web.Request) -> web.Response:
    _, state = await _find(request)
    if state is None or not state.finished:
        return web.json_response({"data": None})  # compute-queues: not finished, or unknown
    logs = await _logs(request, state)
    return web.json_response(
        {"data": cq_record(state, blob_url=_blob_url(request), with_result=True, logs=logs)}
    )


async def history(request: web.Request) -> web.Response:
    state = await _load(request)
    return web.json_response(
        {
            "data": [
                {
                    "seq": h.seq,
                    "type": h.type,
                    "signer": h.signer,
                    "time": h.ts,
                    "accepted": h.accepted,
                }
                for h in state.history
            ]
        }
    )


def _log_route(kinds: tuple[str, ...]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        since = api.int_query(request, "since", 1, 1, sse.MAX_SEQ)
        state = await _load(request)
        chunks, cursor = await read_logs(request.app[LOG], state, since)
        budget = request.app[CONFIG].limits.max_log_response_bytes
        kept, cursor, more = api.bounded_logs(chunks, cursor, budget)
        return web.json_response(
            {
                "data": [
                    c.data.decode("utf-8", errors="replace") for c in kept if c.stream in kinds
                ],
                "sliceStart": since,
                "nextCursor": cursor,
                "isFinal": state.finished and not more,
            }
        )

    return handler


async def outputs(request: web.Request) -> web.StreamResponse:
    state = await _load(request)
    return await api.output_response(request, state, request.match_info["path"])


async def inputs(request: web.Request) -> web.StreamResponse:
    state = await _load(request)
    return await api.input_response(request, state, request.match_info["path"])


def _cancel_namespace(request: web.Request) -> str:
    """The namespace a cancel removes: ``?namespace=`` or the path's (``_`` by default; ``*``
    for all). compute-queues reads only the query; a path and a query that differ are 400."""
    query, path = request.query.get("namespace"), request.match_info.get("namespace")
    if query and path and query != path:
        raise InvalidInput(
            f"the cancel names namespace {path!r} in the path and {query!r} in the query: name one"
        )
    return validate_namespace(path or query or DEFAULT_NAMESPACE, allow_all=True)


async def cancel(request: web.Request) -> web.Response:
    """compute-queues' cancel: removes one namespace (``*``: all) from the job, which is
    cancelled once no namespace holds it. Answers at once."""
    queue, jid = _queue(request), _job(request)
    namespace = _cancel_namespace(request)
    message = request.query.get("message") or "cancelled through the gateway"
    message = api.check_message(message)
    before = await jobs.read_job(request.app[LOG], queue, jid)
    if before is None:
        return web.json_response({"message": "Job not found"})  # compute-queues: 200
    if before.finished:
        return web.json_response({"message": "Job already Finished|Removed"})
    await api.cancel_and_notify(request, queue, jid, message, before, namespace=namespace)
    return web.json_response({"success": True, "jobId": jid, "namespace": namespace})


async def namespaces(request: web.Request) -> web.Response:
    """``{data: [namespace]}``: the namespaces holding the job (``[]`` for an unknown one,
    as compute-queues answers)."""
    queue, jid = _queue(request), _job(request)
    state = await jobs.read_job(request.app[LOG], queue, jid)
    return web.json_response({"data": list(state.namespaces) if state is not None else []})


async def copy(request: web.Request) -> web.Response:
    """compute-queues' ``POST /j/<id>/copy`` ``{queue, control?}``: the same job (id and
    definition) submitted to another queue, held for ``control.namespace``, with the
    control's callbacks."""
    body = await read_json(request, request.app[CONFIG].limits.max_body_bytes)
    if not isinstance(body, dict):
        raise InvalidInput(
            'the body must be a JSON object: {"queue": "<queue to copy the job to>", '
            '"control": {"namespace": "..."}}'
        )
    if not body.get("queue"):
        raise InvalidInput('the copy needs the queue to copy the job to: {"queue": "<queue>"}')
    target = subjects.validate_queue(body["queue"])
    state = await _load(request)
    submitted = await api.submit_definition(
        request, target, state.definition, control=body.get("control")
    )
    return web.json_response({"success": True, "jobId": submitted.job_id})


async def stream(request: web.Request) -> web.StreamResponse:
    """compute-queues' (PCG) job stream: ``state``, ``run-log``, ``build-log``, ``final``."""
    queue, jid = _queue(request), _job(request)
    await api.load_job(request, queue, jid)
    start = sse.Cursor.parse(
        request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    )
    blob_url = _blob_url(request)

    async def events() -> AsyncIterator[sse.Outgoing]:
        async for ev in sse.job_events(request.app[FOLLOWERS], queue, jid, start):
            cursor = str(ev.cursor) if ev.cursor else None
            if ev.kind == "log":
                run = [
                    c.data.decode("utf-8", errors="replace")
                    for c in ev.chunks
                    if c.stream in RUN_STREAMS
                ]
                build = [
                    c.data.decode("utf-8", errors="replace")
                    for c in ev.chunks
                    if c.stream in BUILD_STREAMS
                ]
                if build:
                    yield "build-log", {"lines": build, "cursor": cursor}, cursor
                if run:
                    yield "run-log", {"lines": run, "cursor": cursor}, cursor
            elif ev.kind == "state":
                cq_state, reason = ev.state.cq_state
                data: dict[str, Any] = {"state": cq_state}
                if reason:
                    data["reason"] = reason
                yield "state", data, cursor
            elif ev.kind == "end":
                yield "final", cq_record(ev.state, blob_url=blob_url, with_result=True), cursor

    return await sse.stream(request, events())


async def blob_get(request: web.Request) -> web.StreamResponse:
    sha = files.parse_sha256(request.match_info["key"])
    return await files.send_blob(request, sha, sha)


async def blob_put(request: web.Request) -> web.StreamResponse:
    sha = files.parse_sha256(request.match_info["key"])
    blobs = request.app[BLOBS]
    url = await blobs.presigned_put(sha, expires_s=request.app[CONFIG].presign_expires_s)
    if url is not None:
        raise web.HTTPFound(url)  # compute-queues: the client follows it with the body
    info = await blobs.exists(sha)
    if info is None:
        info = await files.receive_blob(request, sha)
    return web.json_response(
        {"success": True, "exists": True, "sha256": info.sha256, "size": info.size}
    )


async def blob_exists(request: web.Request) -> web.Response:
    sha = files.parse_sha256(request.match_info["key"])
    info = await request.app[BLOBS].exists(sha)
    return web.json_response(files.blob_exists_view(info), status=200 if info else 404)


def add_routes(app: web.Application) -> None:
    r = app.router
    for q in ("/q/{queue}", "/q/{queue}/j"):
        r.add_post(q, submit)
        r.add_get(q, list_queue)
    r.add_get("/q/{queue}/status", status)
    r.add_get("/q/{queue}/metrics", api.get_metrics)
    r.add_get("/q/{queue}/j/{job}/stream", stream, allow_head=False)
    for prefix in ("/q/{queue}/j/{job}", "/j/{job}"):
        r.add_get(f"{prefix}/definition.json", definition)
        r.add_get(f"{prefix}/result.json", result)
        r.add_get(f"{prefix}/results.json", result)
        r.add_get(f"{prefix}/history.json", history)
        r.add_get(f"{prefix}/run-logs.json", _log_route(RUN_STREAMS))
        r.add_get(f"{prefix}/build-logs.json", _log_route(BUILD_STREAMS))
        r.add_get(f"{prefix}/inputs/{{path:.+}}", inputs)
        r.add_get(f"{prefix}/outputs/{{path:.+}}", outputs)
        r.add_post(f"{prefix}/cancel", cancel)
        r.add_post(f"{prefix}/copy", copy)
        r.add_get(prefix, job)
    r.add_get("/q/{queue}/j/{job}/namespaces.json", namespaces)
    r.add_post("/q/{queue}/j/{job}/{namespace}/cancel", cancel)
    r.add_get("/f/{key}", blob_get)
    r.add_put("/f/{key}", blob_put)
    r.add_get("/f/{key}/exists", blob_exists)
