"""The OpenAPI 3.1 document of the gateway, served at ``/openapi.json``.

Written by hand, next to the handlers it describes, but for the schemas of the job
definition and of the TES task types, which are generated from their pydantic models
(``asman.gateway.schemas``); a test fuzzes the gateway from it (schemathesis) and checks that
every route the app serves is in it.
"""

from __future__ import annotations

from typing import Any

from asman import __version__
from asman.gateway.config import GatewayConfig
from asman.gateway.schemas import component_schemas

__all__ = ["openapi_document"]

JSON = "application/json"
QUEUE_RE = "^[A-Za-z0-9_-]{1,64}$"
SHA_RE = "^[0-9a-f]{64}$"
B64URL_RE = "^[A-Za-z0-9_-]*={0,2}$"
NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 256}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input: the body says what is wrong",
        403: "This gateway may not do that (e.g. cancel a job another peer submitted)",
        404: "Not found",
        409: "The job moved on since the event was prepared: prepare and sign again",
        413: "Body over its limit",
        429: "Rate limited (see Retry-After)",
        503: "The log (NATS) cannot be reached",
    }
    out = {str(c): _json(_ref("Error"), text[c]) for c in codes}
    out.setdefault("429", _json(_ref("Error"), text[429]))
    out.setdefault("503", _json(_ref("Error"), text[503]))
    return out


def _param(
    name: str, where: str, schema: dict[str, Any], description: str, required: bool = True
) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": required if where != "path" else True,
        "description": description,
        "schema": schema,
    }


QUEUE = _param(
    "queue", "path", {"type": "string", "pattern": QUEUE_RE}, "Queue name (a capability)"
)
JOB = _param(
    "job", "path", {"type": "string", "pattern": SHA_RE}, "Job id: SHA-256 of the definition"
)
PATH = _param(
    "path", "path", {"type": "string", "minLength": 1}, "File path, relative, may hold '/'"
)
SHA = _param("sha256", "path", {"type": "string", "pattern": SHA_RE}, "SHA-256 of the blob's bytes")
KEY = _param("key", "path", {"type": "string", "pattern": SHA_RE}, "SHA-256 of the blob's bytes")
QUEUE_QUERY = _param(
    "queue",
    "query",
    {"type": "string", "pattern": QUEUE_RE},
    "The job's queue (needed: cancelling searches no queue)",
)
QUEUE_LOOKUP = _param(
    "queue",
    "query",
    {"type": "string", "pattern": QUEUE_RE},
    "The job's queue; without it the job is looked for on the queues the gateway exposes "
    "(400 when it exposes none)",
    False,
)
DOWNLOAD = _param(
    "download", "query", {"type": "string", "enum": ["1", "0"]}, "1: send as an attachment", False
)
LAST_EVENT = _param(
    "Last-Event-ID", "header", {"type": "string"}, "Resume after this event id", False
)

BYTES = {
    "description": "The file's bytes (or 302 to a presigned URL when blobs live in S3)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
REDIRECT = {"description": "Redirect to a presigned S3 URL (or the input's own URL)"}
SSE = {
    "description": "Server-Sent Events (see docs/reference/http-api.md)",
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}


def _schemas() -> dict[str, Any]:
    nullable_int = {"type": ["integer", "null"]}
    nullable_str = {"type": ["string", "null"]}
    return {
        "Error": {
            "type": "object",
            "required": ["error", "code", "status"],
            "properties": {
                "error": {"type": "string", "description": "What is wrong, for people"},
                "code": {"type": "string", "description": "Stable machine-readable code"},
                "status": {"type": "integer"},
                "field": {"type": "string"},
                "queue": {"type": "string"},
                "jobId": {"type": "string"},
                "path": {"type": "string"},
            },
        },
        "SubmitRequest": {
            "type": "object",
            "required": ["definition"],
            "properties": {
                "definition": _ref("Definition"),
                "rerun": {"type": "boolean"},
                "namespace": {
                    **NAMESPACE,
                    "description": "Hold the job for this namespace (compute-queues'); "
                    "a newer job in it replaces this one",
                },
                "control": {
                    **_ref("Control"),
                    "description": "Callbacks, and the namespace again: when both name one "
                    "they must agree",
                },
            },
            "additionalProperties": False,
        },
        "Callback": {
            "type": "object",
            "description": "POST a signed JSON body to url (docs/guide.md, Callbacks); "
            "payload comes back as the body's config",
            "required": ["url"],
            "properties": {
                "url": {"type": "string", "pattern": "^https?://", "maxLength": 2048},
                "payload": {},
            },
            "additionalProperties": False,
        },
        "Control": {
            "type": "object",
            "description": "How the queue treats the job (compute-queues' control); not "
            "part of the job id",
            "properties": {
                "namespace": NAMESPACE,
                "callbacks": {
                    "type": "object",
                    "properties": {"queued": _ref("Callback"), "finished": _ref("Callback")},
                    "additionalProperties": False,
                },
                "maxDuration": {},
                "outputs": {},
            },
            "additionalProperties": False,
        },
        "PrepareSubmit": {
            "type": "object",
            "required": ["definition", "key"],
            "properties": {
                "definition": _ref("Definition"),
                "key": {
                    "type": "string",
                    "pattern": SHA_RE,
                    "description": "Your Ed25519 public key: its 32 raw bytes in hex",
                },
                "namespace": NAMESPACE,
                "control": {
                    **_ref("Control"),
                    "description": "Goes in the event you sign, as with a plain submission",
                },
            },
            "additionalProperties": False,
        },
        "PrepareCancel": {
            "type": "object",
            "required": ["key"],
            "properties": {
                "key": {"type": "string", "pattern": SHA_RE},
                "message": {"type": "string", "maxLength": 1000},
            },
            "additionalProperties": False,
        },
        "Prepared": {
            "type": "object",
            "description": "An event for your key to sign: sign the bytes of toSign (Ed25519) "
            "and send protected, payload and the signature to commit",
            "required": ["jobId", "event", "protected", "payload", "toSign", "commit"],
            "properties": {
                "queue": {"type": "string"},
                "jobId": {"type": "string"},
                "subject": {"type": "string"},
                "signer": {"type": "string"},
                "event": {"type": "object", "description": "The event, as readers will see it"},
                "protected": {"type": "string", "description": "base64url"},
                "payload": {"type": "string", "description": "base64url"},
                "toSign": {
                    "type": "string",
                    "description": "base64url of the COSE Sig_structure: the bytes to sign",
                },
                "commit": {"type": "string", "description": "Where to send the signed event"},
            },
        },
        "SignedEvent": {
            "type": "object",
            "required": ["protected", "payload", "signature"],
            "properties": {
                "protected": {"type": "string", "pattern": B64URL_RE},
                "payload": {"type": "string", "pattern": B64URL_RE},
                "signature": {
                    "type": "string",
                    "pattern": B64URL_RE,
                    "description": "base64url of the 64-byte Ed25519 signature of toSign",
                },
            },
            "additionalProperties": False,
        },
        "Output": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "size": {"type": "integer"},
                "sha256": {"type": "string"},
                "inline": {"type": "boolean"},
                "url": {"type": "string"},
            },
        },
        "Result": {
            "type": "object",
            "properties": {
                "reason": {
                    "type": "string",
                    "enum": ["success", "failed", "error", "timed_out", "cancelled", "worker_lost"],
                },
                "exitCode": nullable_int,
                "oomKilled": {"type": "boolean"},
                "durationMs": nullable_int,
                "message": {"type": "string"},
                "worker": {"type": "string"},
                "trustedWorker": {
                    "type": "boolean",
                    "description": "run by a worker the queue's policy trusts (false on an "
                    "open queue, where any worker's result counts)",
                },
                "attempt": {"type": "integer"},
                "finishedMs": {"type": "integer"},
                "replacedBy": nullable_str,
                "outputs": {"type": "array", "items": _ref("Output")},
                "log": {"type": ["object", "null"]},
            },
        },
        "Waiting": {
            "type": ["object", "null"],
            "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
        },
        "Job": {
            "type": "object",
            "required": ["queue", "jobId", "state"],
            "properties": {
                "queue": {"type": "string"},
                "jobId": {"type": "string"},
                "state": {"type": "string", "enum": ["queued", "running", "finished"]},
                "reason": nullable_str,
                "tesState": {"type": "string"},
                "cqState": {"type": "string"},
                "cqFinishedReason": nullable_str,
                "submittedMs": {"type": "integer"},
                "startedMs": nullable_int,
                "finishedMs": nullable_int,
                "attempts": {"type": "integer"},
                "worker": nullable_str,
                "cancelRequested": {"type": "boolean"},
                "namespaces": {"type": "array", "items": {"type": "string"}},
                "submitter": {"type": "string"},
                "via": {"type": "string"},
                "seq": {"type": "integer"},
                "control": _ref("Control"),
                "result": {"oneOf": [_ref("Result"), {"type": "null"}]},
                "waiting": _ref("Waiting"),
                "definition": _ref("Definition"),
                "history": {"type": "array", "items": {"type": "object"}},
                "links": {"type": "object"},
                "created": {"type": "boolean"},
                "cached": {"type": "boolean"},
                "requeued": {"type": "boolean"},
            },
        },
        "JobSummary": {
            "type": "object",
            "properties": {
                "jobId": {"type": "string"},
                "state": {"type": "string"},
                "reason": nullable_str,
                "submittedMs": {"type": "integer"},
                "finishedMs": nullable_int,
                "exitCode": nullable_int,
                "namespaces": {"type": "array", "items": {"type": "string"}},
                "seq": {"type": "integer"},
            },
        },
        "Worker": {
            "type": "object",
            "properties": {
                "workerId": {"type": "string"},
                "slots": {"type": "integer"},
                "freeSlots": {"type": "integer"},
                "gpus": {"type": "integer"},
                "freeGpus": {"type": "integer"},
                "memoryBytes": {"type": "integer"},
                "labels": {"type": "array", "items": {"type": "string"}},
                "running": {"type": "array", "items": {"type": "string"}},
                "draining": {"type": "boolean"},
            },
        },
        "LogChunk": {
            "type": "object",
            "properties": {
                "seq": {"type": "integer"},
                "attempt": {"type": "integer"},
                "stream": {"type": "string", "enum": ["stdout", "stderr", "build", "system"]},
                "ts": {"type": "integer"},
                "text": {"type": "string"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["ok", "nats"],
            "properties": {
                "ok": {"type": "boolean"},
                "nats": {"type": "string", "enum": ["connected", "disconnected"]},
            },
        },
        "BlobExists": {
            "type": "object",
            "required": ["exists"],
            "properties": {
                "exists": {"type": "boolean"},
                "sha256": {"type": "string"},
                "size": {"type": "integer"},
            },
        },
        "CqRecord": {
            "type": "object",
            "description": "compute-queues' InMemoryDockerJob",
            "properties": {
                "queuedTime": {"type": "integer"},
                "state": {"type": "string", "enum": ["Queued", "Running", "Finished"]},
                "time": {"type": "integer"},
                "worker": {"type": "string"},
                "finishedReason": {"type": "string"},
                "finished": {"type": "object"},
            },
        },
    }


def _op(
    summary: str,
    responses: dict[str, Any],
    *params: dict[str, Any],
    body: dict[str, Any] | None = None,
    tag: str = "asman",
) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if params:
        op["parameters"] = list(params)
    if body is not None:
        op["requestBody"] = body
    return op


def _native() -> dict[str, Any]:
    p = "/api/v1"
    q = f"{p}/queues/{{queue}}"
    j = f"{q}/jobs/{{job}}"
    submit_body = {"required": True, "content": {JSON: {"schema": _ref("SubmitRequest")}}}
    return {
        f"{p}/validate": {
            "post": _op(
                "Check a definition and compute its job id (nothing is submitted)",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "jobId": {"type": "string"},
                                "class": {"type": "string"},
                                "definition": _ref("Definition"),
                            },
                        },
                        "The definition is valid",
                    ),
                    **_errors(400, 413),
                },
                body={
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["definition"],
                                "properties": {
                                    "definition": _ref("Definition"),
                                    "control": _ref("Control"),
                                },
                            }
                        }
                    },
                },
            )
        },
        f"{p}/schema/definition.json": {
            "get": _op(
                "The job definition's JSON Schema (2020-12), generated from the models that "
                "validate it; the page's editor reads it",
                {"200": _json({"type": "object"}, "JSON Schema")},
            )
        },
        f"{p}/info": {
            "get": _op(
                "The gateway's name, version, peer id, blob store and limits",
                {"200": _json({"type": "object"}, "Gateway info")},
            )
        },
        f"{p}/health": {
            "get": _op(
                "Health: 200 while connected to NATS, 503 while it is away",
                {
                    "200": _json(_ref("Health"), "Healthy"),
                    "503": _json(_ref("Health"), "Not connected"),
                },
            )
        },
        f"{q}/jobs": {
            "get": _op(
                "List a queue's jobs (within retention), oldest submission first",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "queue": {"type": "string"},
                                "count": {"type": "integer"},
                                "jobs": {"type": "array", "items": _ref("JobSummary")},
                            },
                        },
                        "The jobs",
                    ),
                    **_errors(400),
                },
                QUEUE,
                _param(
                    "state",
                    "query",
                    {"type": "string", "enum": ["queued", "running", "finished"]},
                    "Only jobs in this state",
                    False,
                ),
                _param(
                    "limit",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": 10000},
                    "At most this many (the newest)",
                    False,
                ),
            ),
            "post": _op(
                "Submit a job (idempotent: the same definition is the same job)",
                {
                    "201": _json(_ref("Job"), "A new job"),
                    "200": _json(
                        _ref("Job"), "The job existed (queued, running, or a cached result)"
                    ),
                    **_errors(400, 403, 413),
                },
                QUEUE,
                body=submit_body,
            ),
        },
        f"{q}/workers": {
            "get": _op(
                "Workers online on the queue (live heartbeats)",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"workers": {"type": "array", "items": _ref("Worker")}},
                        },
                        "The workers",
                    ),
                    **_errors(400),
                },
                QUEUE,
            )
        },
        f"{q}/policy": {
            "get": _op(
                "The queue's policy: open, not written yet, or its latest version",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "queue": {"type": "string"},
                                "ownerBound": {"type": "boolean"},
                                "summary": {"type": "string"},
                                "policy": {"type": ["object", "null"]},
                            },
                        },
                        "The policy",
                    ),
                    **_errors(400),
                },
                QUEUE,
            )
        },
        f"{q}/metrics": {
            "get": _op(
                "Prometheus metrics of the queue",
                {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    **_errors(400),
                },
                QUEUE,
            )
        },
        f"{q}/events": {
            "get": _op(
                "The queue's jobs and workers, live (SSE)",
                {"200": SSE, **_errors(400)},
                QUEUE,
                LAST_EVENT,
            )
        },
        j: {
            "get": _op(
                "A job: definition, state, result, history",
                {"200": _json(_ref("Job"), "The job"), **_errors(400, 404)},
                QUEUE,
                JOB,
            )
        },
        f"{j}/cancel": {
            "post": _op(
                "Cancel a job this gateway submitted (signed by its own key; a job "
                "submitted with your own key: cancel/prepare, then signed)",
                {
                    "200": _json(_ref("Job"), "The job after the cancel"),
                    **_errors(400, 403, 404, 413),
                },
                QUEUE,
                JOB,
                body={
                    "required": False,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "properties": {
                                    "message": {"type": "string", "maxLength": 1000},
                                    "namespace": {
                                        **NAMESPACE,
                                        "description": "Remove only this namespace ('*': "
                                        "all); the job is cancelled once none holds it",
                                    },
                                },
                                "additionalProperties": False,
                            }
                        }
                    },
                },
            )
        },
        f"{q}/jobs/prepare": {
            "post": _op(
                "Prepare a submission for your own key to sign (nothing is written)",
                {"200": _json(_ref("Prepared"), "The event to sign"), **_errors(400, 413)},
                QUEUE,
                body={"required": True, "content": {JSON: {"schema": _ref("PrepareSubmit")}}},
            )
        },
        f"{j}/cancel/prepare": {
            "post": _op(
                "Prepare a cancel for the key that submitted the job to sign (nothing is "
                "written; 403 for another key)",
                {
                    "200": _json(_ref("Prepared"), "The event to sign"),
                    **_errors(400, 403, 404, 413),
                },
                QUEUE,
                JOB,
                body={"required": True, "content": {JSON: {"schema": _ref("PrepareCancel")}}},
            )
        },
        f"{j}/signed": {
            "post": _op(
                "Append a submission or cancel signed by your key (from a prepare)",
                {
                    "201": _json(_ref("Job"), "A new job (a submission)"),
                    "200": _json(_ref("Job"), "The job after the event"),
                    **_errors(400, 403, 404, 409, 413),
                },
                QUEUE,
                JOB,
                body={"required": True, "content": {JSON: {"schema": _ref("SignedEvent")}}},
            )
        },
        f"{j}/logs": {
            "get": _op(
                "Log chunks from a cursor (the first call uses 1)",
                {
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {
                                "chunks": {"type": "array", "items": _ref("LogChunk")},
                                "cursor": {"type": "integer"},
                                "more": {"type": "boolean"},
                                "final": {"type": "boolean"},
                            },
                        },
                        "Chunks and the next cursor",
                    ),
                    **_errors(400, 404),
                },
                QUEUE,
                JOB,
                _param(
                    "cursor", "query", {"type": "integer", "minimum": 1}, "Where to start", False
                ),
            )
        },
        f"{j}/events": {
            "get": _op(
                "The job's state, logs and result, live (SSE)",
                {"200": SSE, **_errors(400, 404)},
                QUEUE,
                JOB,
                LAST_EVENT,
            )
        },
        f"{j}/outputs/{{path}}": {
            "get": _op(
                "An output file by path",
                {"200": BYTES, "302": REDIRECT, **_errors(400, 404)},
                QUEUE,
                JOB,
                PATH,
                DOWNLOAD,
            )
        },
        f"{j}/inputs/{{path}}": {
            "get": _op(
                "An input file by path",
                {"200": BYTES, "302": REDIRECT, **_errors(400, 404)},
                QUEUE,
                JOB,
                PATH,
                DOWNLOAD,
            )
        },
        f"{p}/blobs/{{sha256}}": {
            "get": _op("A blob's bytes", {"200": BYTES, "302": REDIRECT, **_errors(400, 404)}, SHA),
            "put": _op(
                "Store a blob (its bytes must hash to the name)",
                {
                    "200": _json({"type": "object"}, "Stored (or already there)"),
                    "307": {"description": "Upload to this presigned S3 URL instead"},
                    **_errors(400, 413),
                },
                SHA,
                body={
                    "required": True,
                    "content": {
                        "application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}
                        }
                    },
                },
            ),
        },
        f"{p}/blobs/{{sha256}}/exists": {
            "get": _op(
                "Whether a blob is stored",
                {
                    "200": _json(_ref("BlobExists"), "Stored"),
                    "404": _json(_ref("BlobExists"), "Not stored"),
                    **_errors(400),
                },
                SHA,
            )
        },
        "/healthz": {
            "get": _op(
                "Health as compute-queues answers it: 200 OK while connected to NATS",
                {
                    "200": {
                        "description": "Healthy: the text OK",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "503": _json(_ref("Health"), "Not connected"),
                },
            )
        },
        "/metrics": {
            "get": _op(
                "The gateway's own Prometheus metrics",
                {
                    "200": {
                        "description": "Prometheus text",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            )
        },
    }


def _compat() -> dict[str, Any]:
    cq = "compute-queues"
    data = {"type": "object", "properties": {"data": {}}}
    enqueue = {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["definition"],
                            "properties": {
                                "definition": _ref("Definition"),
                                "id": {"type": "string"},
                                "control": _ref("Control"),
                                "debug": {"type": "boolean"},
                            },
                        },
                        _ref("Definition"),
                    ]
                }
            }
        },
    }
    submitted = _json(
        {
            "type": "object",
            "properties": {"success": {"type": "boolean"}, "jobId": {"type": "string"}},
        },
        "Submitted",
    )
    paths: dict[str, Any] = {}
    for q in ("/q/{queue}", "/q/{queue}/j"):
        paths[q] = {
            "post": _op(
                "Submit (EnqueueJob or a bare definition)",
                {"200": submitted, **_errors(400, 413)},
                QUEUE,
                body=enqueue,
                tag=cq,
            ),
            "get": _op(
                "The queue's jobs as {data: {jobId: record}}",
                {"200": _json(data, "Jobs"), **_errors(400)},
                QUEUE,
                tag=cq,
            ),
        }
    paths["/q/{queue}/status"] = {
        "get": _op(
            "Queue status",
            {"200": _json({"type": "object"}, "Status"), **_errors(400)},
            QUEUE,
            tag=cq,
        )
    }
    paths["/q/{queue}/metrics"] = {
        "get": _op(
            "Prometheus metrics (queue_length and Asman's gauges)",
            {
                "200": {
                    "description": "Prometheus text",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                **_errors(400),
            },
            QUEUE,
            tag=cq,
        )
    }
    paths["/q/{queue}/j/{job}/stream"] = {
        "get": _op(
            "Job stream: state, run-log, build-log, final (SSE)",
            {"200": SSE, **_errors(400, 404)},
            QUEUE,
            JOB,
            LAST_EVENT,
            tag=cq,
        )
    }
    paths["/q/{queue}/j/{job}/{namespace}/cancel"] = {
        "post": _op(
            "Remove one namespace from the job ('*': all); cancelled once none holds it",
            {"200": _json({"type": "object"}, "Cancelled"), **_errors(400, 403, 404)},
            QUEUE,
            JOB,
            _param("namespace", "path", NAMESPACE, "The namespace to remove"),
            tag=cq,
        )
    }
    paths["/q/{queue}/j/{job}/namespaces.json"] = {
        "get": _op(
            "{data: [namespace]}: the namespaces holding the job ([] for an unknown one)",
            {"200": _json(data, "Namespaces"), **_errors(400)},
            QUEUE,
            JOB,
            tag=cq,
        )
    }
    copy_body = {
        "required": True,
        "content": {
            JSON: {
                "schema": {
                    "type": "object",
                    "required": ["queue"],
                    "properties": {
                        "queue": {"type": "string", "pattern": QUEUE_RE},
                        "control": _ref("Control"),
                    },
                }
            }
        },
    }
    for prefix, extra, for_cancel in (
        ("/q/{queue}/j/{job}", [QUEUE, JOB], [QUEUE, JOB]),
        ("/j/{job}", [JOB, QUEUE_LOOKUP], [JOB, QUEUE_QUERY]),
    ):
        paths[prefix] = {
            "get": _op(
                "{data: {definition, results}}",
                {"200": _json(data, "The job"), **_errors(400, 404)},
                *extra,
                tag=cq,
            )
        }
        paths[f"{prefix}/definition.json"] = {
            "get": _op(
                "{data: definition}, or {data: null} for an unknown job",
                {"200": _json(data, "Definition"), **_errors(400, 404)},
                *extra,
                tag=cq,
            )
        }
        for name in ("result.json", "results.json"):
            paths[f"{prefix}/{name}"] = {
                "get": _op(
                    "{data: record with finished.result}, or {data: null} until finished "
                    "and for an unknown job",
                    {"200": _json(data, "Result"), **_errors(400, 404)},
                    *extra,
                    tag=cq,
                )
            }
        paths[f"{prefix}/history.json"] = {
            "get": _op(
                "{data: events}",
                {"200": _json(data, "History"), **_errors(400, 404)},
                *extra,
                tag=cq,
            )
        }
        for name in ("run-logs.json", "build-logs.json"):
            paths[f"{prefix}/{name}"] = {
                "get": _op(
                    "{data: lines, sliceStart, nextCursor, isFinal}",
                    {"200": _json({"type": "object"}, "Log lines"), **_errors(400, 404)},
                    *extra,
                    _param("since", "query", {"type": "integer", "minimum": 1}, "Cursor", False),
                    tag=cq,
                )
            }
        for kind in ("inputs", "outputs"):
            paths[f"{prefix}/{kind}/{{path}}"] = {
                "get": _op(
                    f"An {kind[:-1]} file by path",
                    {"200": BYTES, "302": REDIRECT, **_errors(400, 404)},
                    *extra,
                    PATH,
                    DOWNLOAD,
                    tag=cq,
                )
            }
        paths[f"{prefix}/cancel"] = {
            "post": _op(
                "Remove a namespace from the job: {success, jobId, namespace}; the job is "
                "cancelled once none holds it",
                {
                    "200": _json({"type": "object"}, "Cancelled, or already finished"),
                    **_errors(400, 403, 404),
                },
                *for_cancel,
                _param(
                    "namespace", "query", NAMESPACE, "The namespace to remove ('_', '*')", False
                ),
                tag=cq,
            )
        }
        paths[f"{prefix}/copy"] = {
            "post": _op(
                "Submit the same job to another queue: {success, jobId}",
                {"200": _json({"type": "object"}, "Copied"), **_errors(400, 404, 413)},
                *extra,
                body=copy_body,
                tag=cq,
            )
        }
    paths["/f/{key}"] = {
        "get": _op(
            "A blob (302 to presigned S3, or the bytes)",
            {"200": BYTES, "302": REDIRECT, **_errors(400, 404)},
            KEY,
            tag=cq,
        ),
        "put": _op(
            "Store a blob (302 to a presigned PUT with S3)",
            {"200": _json({"type": "object"}, "Stored"), "302": REDIRECT, **_errors(400, 413)},
            KEY,
            body={
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            },
            tag=cq,
        ),
    }
    paths["/f/{key}/exists"] = {
        "get": _op(
            "{exists}",
            {
                "200": _json(_ref("BlobExists"), "Stored"),
                "404": _json(_ref("BlobExists"), "Not stored"),
                **_errors(400),
            },
            KEY,
            tag=cq,
        )
    }
    return paths


def _tes() -> dict[str, Any]:
    """GA4GH TES 1.1 per queue, under ``/q/{queue}/ga4gh/tes/v1``."""
    base = "/q/{queue}/ga4gh/tes/v1"
    tag = "ga4gh-tes"
    task_id = _param(
        "id", "path", {"type": "string", "pattern": SHA_RE}, "Task id (the Asman job id)"
    )
    view = _param(
        "view",
        "query",
        {"type": "string", "enum": ["MINIMAL", "BASIC", "FULL"]},
        "How much of the task: MINIMAL (the default) is id and state",
        required=False,
    )
    task = _json(_ref("TesTask"), "The task")
    created = _json(
        {"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}},
        "The task's id (the same task gives the same id: its job's)",
    )
    return {
        f"{base}/service-info": {
            "get": _op(
                "TES service info: type org.ga4gh:tes:1.1.0 and the storage it reads",
                {"200": _json({"type": "object"}, "Service info"), **_errors(400)},
                QUEUE,
                tag=tag,
            )
        },
        f"{base}/tasks": {
            "post": _op(
                "Create a task: a job whose executors run as its steps",
                {"200": created, **_errors(400, 403, 413)},
                QUEUE,
                body={"required": True, "content": {JSON: {"schema": _ref("TesTask")}}},
                tag=tag,
            ),
            "get": _op(
                "List the queue's tasks, newest first",
                {
                    "200": _json(_ref("TesListTasksResponse"), "A page of tasks"),
                    **_errors(400),
                },
                QUEUE,
                view,
                _param("name_prefix", "query", {"type": "string"}, "Name starts with", False),
                _param(
                    "state",
                    "query",
                    {"type": "string"},
                    "Only tasks in this TES state",
                    False,
                ),
                _param(
                    "tag_key",
                    "query",
                    {"type": "array", "items": {"type": "string"}},
                    "Tasks with this tag (repeatable)",
                    False,
                ),
                _param(
                    "tag_value",
                    "query",
                    {"type": "array", "items": {"type": "string"}},
                    "The value of the tag_key at the same place ('' or absent: any)",
                    False,
                ),
                _param(
                    "page_size",
                    "query",
                    {"type": "integer", "minimum": 1, "maximum": 2047},
                    "Tasks per page (default 256)",
                    False,
                ),
                _param("page_token", "query", {"type": "string"}, "next_page_token", False),
                tag=tag,
            ),
        },
        f"{base}/tasks/{{id}}": {
            "get": _op("A task", {"200": task, **_errors(400, 404)}, QUEUE, task_id, view, tag=tag)
        },
        f"{base}/tasks/{{id}}:cancel": {
            "post": _op(
                "Cancel a task (CANCELING until its worker stopped it, then CANCELED)",
                {"200": _json({"type": "object"}, "Accepted"), **_errors(400, 403, 404)},
                QUEUE,
                task_id,
                tag=tag,
            )
        },
    }


def openapi_document(config: GatewayConfig) -> dict[str, Any]:
    """The document (``servers`` is the configured public URL when there is one)."""
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Asman gateway",
            "version": __version__,
            "description": "Public compute queues on a shared log. Asman's own API is under "
            "/api/v1; the compute-queues routes (/q, /j, /f) keep that system's shapes. "
            "Every error is a JSON body {error, code, status}. See docs/reference/http-api.md.",
        },
        "paths": {**_native(), **_compat(), **_tes()},
        "components": {"schemas": {**_schemas(), **component_schemas()}},
        "tags": [
            {"name": "asman", "description": "Asman's own API"},
            {"name": "compute-queues", "description": "Routes and shapes of compute-queues"},
            {"name": "ga4gh-tes", "description": "GA4GH TES 1.1, per queue"},
        ],
    }
    if config.public_url:
        doc["servers"] = [{"url": config.public_url.rstrip("/")}]
    return doc
