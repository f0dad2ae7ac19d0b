"""Asman's own JSON API, under ``/api/v1`` (documented in /openapi.json and
docs/reference/http-api.md).

Handlers parse and check what comes in (queue names, job ids, paths, bodies, definitions
against the gateway's limits), call ``asman.log``, and render with ``asman.gateway.views``.
Nothing invalid reaches the log: a definition is validated here with the gateway's limits and
again by ``submit``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web

from asman import __version__
from asman.errors import InvalidDefinition, InvalidInput, JobNotFound
from asman.gateway import files, sse
from asman.gateway.limits import read_json
from asman.gateway.metrics import CONTENT_TYPE, queue_metrics
from asman.gateway.state import (
    BLOBS,
    CALLBACKS,
    CLOSING,
    CONFIG,
    FOLLOWERS,
    LOG,
    METRICS,
    REPLACER,
)
from asman.gateway.views import (
    chunk_view,
    job_summary,
    job_view,
    worker_view,
)
from asman.log import jobs, namespaces, subjects
from asman.log.control import validate_control, with_namespace
from asman.log.definition import (
    DataRef,
    image_class,
    job_id,
    validate_definition,
    validate_relative_path,
)
from asman.log.events import JobState, OutputFile, now_ms, validate_namespace
from asman.log.logstream import LogChunk, read_logs
from asman.log.policy import summarize
from asman.log.workers import list_workers

__all__ = [
    "PREFIX",
    "add_routes",
    "bounded_logs",
    "cancel_and_notify",
    "check_message",
    "find_input",
    "find_output",
    "input_response",
    "int_query",
    "job_base",
    "job_param",
    "load_job",
    "output_response",
    "public_base",
    "queue_param",
    "submit_definition",
    "submitted_response",
]

PREFIX = "/api/v1"
MAX_LIST = 10_000
MAX_MESSAGE = 1000


# -- shared helpers (the compute-queues routes use them too) -------------------------------------


def queue_param(request: web.Request, name: str = "queue") -> str:
    return subjects.validate_queue(request.match_info.get(name) or request.query.get(name, ""))


def job_param(request: web.Request) -> str:
    return subjects.validate_job_id(request.match_info["job"])


def job_base(queue: str, job: str) -> str:
    return f"{PREFIX}/queues/{queue}/jobs/{job}"


def public_base(request: web.Request) -> str:
    """The gateway's external origin: the configured public URL, else the request's own."""
    configured = request.app[CONFIG].public_url
    if configured:
        return configured.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def load_job(request: web.Request, queue: str, job: str) -> JobState:
    state = await jobs.read_job(request.app[LOG], queue, job)
    if state is None:
        raise JobNotFound(queue, job)
    return state


async def submit_definition(
    request: web.Request,
    queue: str,
    definition: Any,
    *,
    rerun: bool = False,
    signed: jobs.SignedEvent | None = None,
    namespace: str | None = None,
    control: Any = None,
) -> jobs.Submitted:
    """Validate ``definition`` with the gateway's limits and submit it, signed by the gateway
    (or, with ``signed``, by the key that signed that very submission), held for
    ``namespace``, with its ``control`` (callbacks: not part of the job; its namespace and
    ``namespace`` are one, ``InvalidInput`` when they differ); the jobs it replaces there
    are released in the background, each after its grace (``asman.log.namespaces``). A job
    this puts on the queue (created, or run again) gets its ``queued`` callback, sent in the
    background by the gateway, which appended the event whoever signed it."""
    config = request.app[CONFIG]
    if not isinstance(definition, Mapping):
        raise InvalidDefinition("", "a job definition must be a JSON object")
    clean = validate_definition(definition, config.limits.definition_limits())
    checked, named = with_namespace(control, namespace)
    submitted = await namespaces.submit(
        request.app[LOG],
        queue,
        clean,
        namespace=named,
        rerun=rerun,
        via=config.name,
        grace=config.replace_grace,
        signed=signed,
        control=checked,
    )
    request.app[REPLACER].schedule(submitted.replacing)
    if submitted.created or submitted.requeued:
        request.app[CALLBACKS].queued(queue, submitted.job_id, checked, submitted.state.last_seq)
    if submitted.created:
        outcome = "created"
    elif submitted.cached:
        outcome = "cached"
    elif submitted.requeued:
        outcome = "requeued"
    else:
        outcome = "existing"
    request.app[METRICS].submitted.labels(outcome).inc()
    return submitted


def find_output(state: JobState, path: str) -> OutputFile | None:
    validate_relative_path(path, "outputs")
    if state.result is None:
        return None
    for f in state.result.outputs:
        if f.path == path:
            return f
    return None


def find_input(state: JobState, path: str) -> DataRef | None:
    """The data reference of input ``path``: from ``inputs``, else a relative ``configFiles``
    entry (both are files under /inputs)."""
    validate_relative_path(path, "inputs")
    for key in ("inputs", "configFiles"):
        refs = state.definition.get(key)
        if isinstance(refs, Mapping) and path in refs:
            return DataRef.from_json(refs[path], f"{key}[{path!r}]")
    return None


async def output_response(request: web.Request, state: JobState, path: str) -> web.StreamResponse:
    found = find_output(state, path)
    if found is None and state.result is None:
        return _missing(f"job {state.job_id} has no outputs yet: it is {state.state}")
    if found is None:
        return _missing(f"job {state.job_id} has no output {path!r}")
    if found.blob.data is not None:
        return await files.send_bytes(request, found.blob.data, path)
    return await files.send_blob(request, found.blob.sha256, path, size=found.blob.size)


async def input_response(request: web.Request, state: JobState, path: str) -> web.StreamResponse:
    ref = find_input(state, path)
    if ref is None:
        return _missing(f"job {state.job_id} has no input {path!r}")
    return await files.send_ref(request, ref, path)


def _missing(message: str) -> web.Response:
    return web.json_response({"error": message, "code": "not_found", "status": 404}, status=404)


def bounded_logs(
    chunks: list[LogChunk], cursor: int, budget: int
) -> tuple[list[LogChunk], int, bool]:
    """Whole log messages up to ``budget`` bytes; returns them, the next cursor, and whether
    more are left."""
    out: list[LogChunk] = []
    size = 0
    for seq, group in _by_seq(chunks):
        group_size = sum(len(c.data) for c in group)
        if out and size + group_size > budget:
            return out, seq, True
        out.extend(group)
        size += group_size
    return out, cursor, False


def _by_seq(chunks: list[LogChunk]) -> list[tuple[int, list[LogChunk]]]:
    groups: list[tuple[int, list[LogChunk]]] = []
    for c in chunks:
        if groups and groups[-1][0] == c.seq:
            groups[-1][1].append(c)
        else:
            groups.append((c.seq, [c]))
    return groups


def int_query(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"query parameter {name}={raw[:20]!r} is not a whole number") from None
    if not lo <= value <= hi:
        raise InvalidInput(f"query parameter {name} must be between {lo} and {hi}, got {value}")
    return value


def _json_type(value: Any) -> str:
    """What a JSON value is, in JSON's words (for error messages)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def _namespace(value: Any, *, allow_all: bool = False) -> str | None:
    return None if value is None else validate_namespace(value, allow_all=allow_all)


def _bool(value: Any, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false, got {value!r}")
    return value


# -- handlers ------------------------------------------------------------------------------------


async def submit_job(request: web.Request) -> web.Response:
    queue = queue_param(request)
    body = await read_json(request, request.app[CONFIG].limits.max_body_bytes)
    if not isinstance(body, dict) or "definition" not in body:
        raise InvalidInput(
            'the body must be {"definition": {...}, "rerun": false, "namespace": "...", '
            '"control": {...}}'
        )
    unknown = set(body) - {"definition", "rerun", "namespace", "control"}
    if unknown:
        raise InvalidInput(f"unknown body fields: {', '.join(sorted(unknown))}")
    submitted = await submit_definition(
        request,
        queue,
        body["definition"],
        rerun=_bool(body.get("rerun"), "rerun"),
        namespace=_namespace(body.get("namespace")),
        control=body.get("control"),
    )
    return submitted_response(submitted)


def submitted_response(submitted: jobs.Submitted) -> web.Response:
    """The answer to a submission: the job, ``201`` when it is new."""
    base = job_base(submitted.queue, submitted.job_id)
    view = job_view(submitted.state, base, history=False)
    view.update(created=submitted.created, cached=submitted.cached, requeued=submitted.requeued)
    return web.json_response(
        view, status=201 if submitted.created else 200, headers={"Location": base}
    )


async def validate(request: web.Request) -> web.Response:
    body = await read_json(request, request.app[CONFIG].limits.max_body_bytes)
    if not isinstance(body, dict) or "definition" not in body:
        raise InvalidInput('the body must be {"definition": {...}, "control": {...}}')
    unknown = set(body) - {"definition", "control"}
    if unknown:
        raise InvalidInput(f"unknown body fields: {', '.join(sorted(unknown))}")
    definition = body["definition"]
    if not isinstance(definition, Mapping):
        raise InvalidDefinition("", "a job definition must be a JSON object")
    clean = validate_definition(definition, request.app[CONFIG].limits.definition_limits())
    answer = {"jobId": job_id(clean), "class": image_class(clean), "definition": clean}
    if body.get("control") is not None:
        answer["control"] = validate_control(body["control"])
    return web.json_response(answer)


async def list_queue(request: web.Request) -> web.Response:
    queue = queue_param(request)
    wanted = request.query.get("state")
    if wanted not in (None, "", "queued", "running", "finished"):
        raise InvalidInput("state must be queued, running or finished")
    limit = int_query(request, "limit", 1000, 1, MAX_LIST)
    states = await jobs.list_jobs(request.app[LOG], queue)
    if wanted:
        states = [s for s in states if s.state == wanted]
    return web.json_response(
        {"queue": queue, "count": len(states), "jobs": [job_summary(s) for s in states[-limit:]]}
    )


async def get_job(request: web.Request) -> web.Response:
    queue, job = queue_param(request), job_param(request)
    state = await load_job(request, queue, job)
    workers = await list_workers(request.app[LOG], queue) if state.state == "queued" else None
    return web.json_response(job_view(state, job_base(queue, job), workers=workers))


async def cancel_job(request: web.Request) -> web.Response:
    queue, job = queue_param(request), job_param(request)
    message = "cancelled through the gateway"
    namespace = None
    if request.can_read_body:
        body = await read_json(request, request.app[CONFIG].limits.max_body_bytes)
        if not isinstance(body, dict):
            raise InvalidInput('the body must be {"message": "...", "namespace": "..."} or empty')
        unknown = set(body) - {"message", "namespace"}
        if unknown:
            raise InvalidInput(
                f"unknown body fields: {', '.join(sorted(unknown))[:200]}; "
                'the body is {"message": "...", "namespace": "..."} or empty'
            )
        if body.get("message") is not None:
            message = check_message(body["message"])
        namespace = _namespace(body.get("namespace"), allow_all=True)
    state = await cancel_and_notify(request, queue, job, message, namespace=namespace)
    return web.json_response(job_view(state, job_base(queue, job), history=False))


async def cancel_and_notify(
    request: web.Request,
    queue: str,
    job: str,
    message: str,
    before: JobState | None = None,
    *,
    namespace: str | None = None,
    signed: jobs.SignedEvent | None = None,
) -> JobState:
    """Cancel the job (``jobs.cancel``: only ``namespace``, or with the ``signed`` cancel of
    another key); when that very cancel finished it (a job that never ran, or whose last
    namespace it removed), send its ``finished`` callback: the event the gateway appended
    ended it. ``before`` is the job as already read, if it was."""
    log = request.app[LOG]
    before = before or await load_job(request, queue, job)
    if before.finished:
        return before
    state = await jobs.cancel(log, queue, job, message, namespace=namespace, signed=signed)
    signer = signed.signer if signed is not None else log.peer_id
    if state.result is not None and state.result.worker == signer:
        request.app[CALLBACKS].finished(state)
    return state


def check_message(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(
            f"message must be text (a JSON string) of at most {MAX_MESSAGE} characters, "
            f"got {_json_type(value)}"
        )
    if len(value) > MAX_MESSAGE:
        raise InvalidInput(
            f"message is {len(value)} characters long, over the limit of {MAX_MESSAGE}"
        )
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidInput("message must be valid Unicode") from None
    return value


async def get_logs(request: web.Request) -> web.Response:
    queue, job = queue_param(request), job_param(request)
    cursor = int_query(request, "cursor", 1, 1, sse.MAX_SEQ)
    state = await load_job(request, queue, job)
    chunks, next_cursor = await read_logs(request.app[LOG], state, cursor)
    budget = request.app[CONFIG].limits.max_log_response_bytes
    chunks, next_cursor, more = bounded_logs(chunks, next_cursor, budget)
    return web.json_response(
        {
            "chunks": [chunk_view(c) for c in chunks],
            "cursor": next_cursor,
            "more": more,
            "final": state.finished and not more,
        }
    )


async def get_output(request: web.Request) -> web.StreamResponse:
    queue, job = queue_param(request), job_param(request)
    state = await load_job(request, queue, job)
    return await output_response(request, state, request.match_info["path"])


async def get_input(request: web.Request) -> web.StreamResponse:
    queue, job = queue_param(request), job_param(request)
    state = await load_job(request, queue, job)
    return await input_response(request, state, request.match_info["path"])


async def get_workers(request: web.Request) -> web.Response:
    queue = queue_param(request)
    workers = await list_workers(request.app[LOG], queue)
    return web.json_response({"queue": queue, "workers": [worker_view(w) for w in workers]})


async def get_policy(request: web.Request) -> web.Response:
    """The queue's policy (asman.log.policy): open, not yet written, or its latest version."""
    queue = queue_param(request)
    view = await request.app[LOG].policies.get(queue)
    policy = view.current if view else None
    return web.json_response(
        {
            "queue": queue,
            "ownerBound": view is not None,
            "summary": summarize(view),
            "policy": policy.to_json() if policy else None,
        }
    )


async def get_metrics(request: web.Request) -> web.Response:
    queue = queue_param(request)
    log = request.app[LOG]
    states = await jobs.list_jobs(log, queue)
    workers = await list_workers(log, queue)
    return web.Response(
        body=queue_metrics(queue, states, workers, now_ms()),
        headers={"Content-Type": CONTENT_TYPE},
    )


async def job_stream(request: web.Request) -> web.StreamResponse:
    queue, job = queue_param(request), job_param(request)
    await load_job(request, queue, job)  # 404 before the stream starts
    start = sse.Cursor.parse(
        request.headers.get("Last-Event-ID") or request.query.get("lastEventId")
    )
    base = job_base(queue, job)

    async def events() -> AsyncIterator[sse.Outgoing]:
        async for ev in sse.job_events(request.app[FOLLOWERS], queue, job, start):
            cursor = str(ev.cursor) if ev.cursor else None
            if ev.kind == "log":
                yield (
                    "log",
                    {"seq": ev.chunks[0].seq, "chunks": [chunk_view(c) for c in ev.chunks]},
                    cursor,
                )
            elif ev.kind == "waiting":
                yield "waiting", ev.waiting, None
            else:
                view = job_view(ev.state, base, definition=False, history=False)
                if ev.kind == "state" and ev.waiting is not None:
                    view["waiting"] = ev.waiting  # the follower's, read once for every stream
                yield ev.kind, view, cursor

    return await sse.stream(request, events())


async def queue_stream(request: web.Request) -> web.StreamResponse:
    queue = queue_param(request)
    raw = request.headers.get("Last-Event-ID") or request.query.get("lastEventId") or "0"
    after = int(raw) if raw.isdigit() and len(raw) <= 18 else 0

    async def events() -> AsyncIterator[sse.Outgoing]:
        async for ev in sse.queue_events(request.app[FOLLOWERS], queue, after):
            if ev.kind == "job" and ev.job is not None:
                yield "job", job_summary(ev.job), str(ev.job.last_seq)
            else:
                yield "workers", [worker_view(w) for w in ev.workers], None

    return await sse.stream(request, events())


async def blob_get(request: web.Request) -> web.StreamResponse:
    sha = files.parse_sha256(request.match_info["sha256"])
    return await files.send_blob(request, sha, sha)


async def blob_put(request: web.Request) -> web.StreamResponse:
    sha = files.parse_sha256(request.match_info["sha256"])
    blobs = request.app[BLOBS]
    url = await blobs.presigned_put(sha, expires_s=request.app[CONFIG].presign_expires_s)
    if url is not None:
        raise web.HTTPTemporaryRedirect(url)
    info = await blobs.exists(sha)
    if info is None:
        info = await files.receive_blob(request, sha)
    return web.json_response({"sha256": info.sha256, "size": info.size, "key": info.key})


async def blob_exists(request: web.Request) -> web.Response:
    sha = files.parse_sha256(request.match_info["sha256"])
    info = await request.app[BLOBS].exists(sha)
    return web.json_response(files.blob_exists_view(info), status=200 if info else 404)


async def info(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    limits = config.limits
    return web.json_response(
        {
            "name": config.name,
            "version": __version__,
            "peerId": request.app[LOG].peer_id,
            "blobs": "s3" if config.blobs_url else "jetstream",
            "limits": {
                "maxBodyBytes": limits.max_body_bytes,
                "maxDefinitionBytes": limits.max_definition_bytes,
                "maxInlineBytes": limits.max_inline_bytes,
                "maxTotalInlineBytes": limits.max_total_inline_bytes,
                "maxInputs": limits.max_inputs,
                "maxBlobBytes": limits.max_blob_bytes,
                "ratePerSecond": limits.rate_per_s,
                "rateBurst": limits.rate_burst,
                "maxStreamsPerClient": limits.max_streams_per_client,
            },
        }
    )


def _connected(request: web.Request) -> bool:
    return not request.app[CLOSING].is_set() and request.app[LOG].nc.is_connected


async def health(request: web.Request) -> web.Response:
    """``/api/v1/health``: 200 ``{ok: true, nats: "connected"}``, or 503 while NATS is away."""
    connected = _connected(request)
    return web.json_response(
        {"ok": connected, "nats": "connected" if connected else "disconnected"},
        status=200 if connected else 503,
    )


async def healthz(request: web.Request) -> web.Response:
    """``/healthz`` as compute-queues answers it: 200 ``OK`` (text/plain) while healthy; 503
    with the JSON of ``/api/v1/health`` while NATS is away."""
    if _connected(request):
        return web.Response(text="OK")
    return await health(request)


async def gateway_metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    r = app.router
    q = f"{PREFIX}/queues/{{queue}}"
    j = f"{q}/jobs/{{job}}"
    r.add_post(f"{PREFIX}/validate", validate)
    r.add_get(f"{PREFIX}/info", info)
    r.add_get(f"{PREFIX}/health", health)
    r.add_get(f"{q}/jobs", list_queue)
    r.add_post(f"{q}/jobs", submit_job)
    r.add_get(f"{q}/workers", get_workers)
    r.add_get(f"{q}/policy", get_policy)
    r.add_get(f"{q}/metrics", get_metrics)
    r.add_get(f"{q}/events", queue_stream, allow_head=False)
    r.add_get(j, get_job)
    r.add_post(f"{j}/cancel", cancel_job)
    r.add_get(f"{j}/logs", get_logs)
    r.add_get(f"{j}/events", job_stream, allow_head=False)
    r.add_get(f"{j}/outputs/{{path:.+}}", get_output)
    r.add_get(f"{j}/inputs/{{path:.+}}", get_input)
    r.add_get(f"{PREFIX}/blobs/{{sha256}}", blob_get)
    r.add_put(f"{PREFIX}/blobs/{{sha256}}", blob_put)
    r.add_get(f"{PREFIX}/blobs/{{sha256}}/exists", blob_exists)
    r.add_get("/healthz", healthz)
    r.add_get("/metrics", gateway_metrics)
