"""The gateway's middlewares: errors as JSON, the per-client rate limit, CORS and headers.

Every error leaves as a JSON body ``{"error": <what is wrong>, "code": <stable code>,
"status": <HTTP status>, ...fields}``, never a traceback and never the page:

=============================  ======  ==========================
error                          status  code
=============================  ======  ==========================
InvalidDefinition              400     invalid_definition (+field)
InvalidQueueName               400     invalid_queue (+queue)
InvalidPath                    400     invalid_path (+path)
TooLarge, BlobTooLarge         413     too_large
other InvalidInput             400     invalid_input
JobNotFound                    404     job_not_found (+jobId, queue if one was named)
BlobNotFound                   404     blob_not_found
UnauthorizedSigner             403     forbidden
BadSignature                   400     bad_signature
other EnvelopeError            400     invalid_envelope
Conflict                       409     conflict
LogUnavailable                 503     log_unavailable
RateLimited                    429     rate_limited (+Retry-After)
unknown route / method         404/405 not_found / method_not_allowed
any other AsmanError           500     <class name in snake case>
anything else                  500     internal (logged with a reference)
=============================  ======  ==========================
"""

from __future__ import annotations

import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from asman.errors import (
    AsmanError,
    BadSignature,
    BlobNotFound,
    BlobTooLarge,
    Conflict,
    EnvelopeError,
    InvalidDefinition,
    InvalidInput,
    InvalidPath,
    InvalidQueueName,
    JobNotFound,
    LogUnavailable,
    UnauthorizedSigner,
)
from asman.gateway.limits import RateLimited, TooLarge, client_key
from asman.gateway.state import CONFIG, LIMITER, METRICS

__all__ = [
    "add_response_headers",
    "error_body",
    "error_middleware",
    "json_error",
    "rate_limit_middleware",
]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CORS_METHODS = "GET, HEAD, POST, PUT, OPTIONS"
CORS_HEADERS = "Content-Type, Last-Event-ID, Cache-Control"
CORS_EXPOSE = "Location, Retry-After, Content-Disposition"
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'"
)
_UNLIMITED = frozenset({"/healthz", "/api/v1/health", "/metrics"})


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """HTTP status and JSON body for an error (see the module docstring)."""
    body: dict[str, Any] = {"error": str(exc)}
    status = 500
    code = "internal"
    if isinstance(exc, TooLarge | BlobTooLarge):
        status, code = 413, "too_large"
    elif isinstance(exc, InvalidDefinition):
        status, code = 400, "invalid_definition"
        body["field"] = exc.field
    elif isinstance(exc, InvalidQueueName):
        status, code = 400, "invalid_queue"
        body["queue"] = exc.queue
    elif isinstance(exc, InvalidPath):
        status, code = 400, "invalid_path"
        body["path"] = exc.path
    elif isinstance(exc, InvalidInput):
        status, code = 400, "invalid_input"
    elif isinstance(exc, JobNotFound):
        status, code = 404, "job_not_found"
        if exc.queue:  # a lookup across the exposed queues names none
            body["queue"] = exc.queue
        body["jobId"] = exc.job_id
        body["message"] = "Job not found"  # compute-queues' clients read `message`
    elif isinstance(exc, BlobNotFound):
        status, code = 404, "blob_not_found"
    elif isinstance(exc, UnauthorizedSigner):
        status, code = 403, "forbidden"
    elif isinstance(exc, BadSignature):
        status, code = 400, "bad_signature"
    elif isinstance(exc, EnvelopeError):  # an envelope a client signed (asman.gateway.signing)
        status, code = 400, "invalid_envelope"
    elif isinstance(exc, Conflict):
        status, code = 409, "conflict"
    elif isinstance(exc, LogUnavailable):
        status, code = 503, "log_unavailable"
    elif isinstance(exc, RateLimited):
        status, code = 429, "rate_limited"
    elif isinstance(exc, AsmanError):
        code = _snake(type(exc).__name__)
    body["code"] = code
    body["status"] = status
    return status, body


def json_error(status: int, code: str, message: str, **fields: Any) -> web.Response:
    return web.json_response(
        {"error": message, "code": code, "status": status, **fields}, status=status
    )


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    if status == 404:
        message = (
            f"no such resource: {request.method} {request.path} "
            "(the API is described at /openapi.json)"
        )
        code = "not_found"
    elif status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
        code = "method_not_allowed"
    elif status == 413:
        limit = request.app[CONFIG].limits.max_body_bytes
        message = f"the request body is over the limit of {limit} bytes"
        code = "too_large"
    else:
        message = exc.reason or exc.text or "request failed"
        code = _snake(type(exc).__name__.removeprefix("HTTP")) or "http_error"
    response = json_error(status, code, message)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every error to a JSON body (and count the request)."""
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            _count(request, exc.status)
            raise  # redirects and the like stay as they are
        response = _http_error(request, exc)
    except RateLimited as exc:
        metrics.rate_limited.inc()
        status, body = error_body(exc)
        response = web.json_response(body, status=status)
        response.headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    except AsmanError as exc:
        status, body = error_body(exc)
        if status >= 500:
            logger.warning("%s %s: %s", request.method, request.path, exc)
        response = web.json_response(body, status=status)
    except (ConnectionResetError, ConnectionError):
        raise
    except Exception:
        ref = uuid.uuid4().hex[:12]
        logger.exception("%s %s failed (ref %s)", request.method, request.path, ref)
        response = json_error(
            500, "internal", f"internal error (reference {ref}); the gateway log has the details"
        )
    _count(request, response.status)
    return response


def _count(request: web.Request, status: int) -> None:
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    request.app[METRICS].requests.labels(request.method, route, str(status)).inc()


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One token per request from the client's bucket (health and metrics are free)."""
    if request.path not in _UNLIMITED:
        config = request.app[CONFIG]
        request.app[LIMITER].take(client_key(request, trust_forwarded=config.trust_forwarded))
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        return web.Response(status=204)  # a CORS preflight: the headers are added on prepare
    return await handler(request)


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: CORS and security headers on every response, streams too."""
    config = request.app[CONFIG]
    origins = config.cors_origins
    origin = request.headers.get("Origin")
    if origins and origin:
        if "*" in origins:
            response.headers["Access-Control-Allow-Origin"] = "*"
        elif origin in origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers.add("Vary", "Origin")
        if "Access-Control-Allow-Origin" in response.headers:
            response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = CORS_METHODS
                response.headers["Access-Control-Allow-Headers"] = CORS_HEADERS
                response.headers["Access-Control-Max-Age"] = "600"
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    ctype = response.headers.get("Content-Type", "") or (response.content_type or "")
    if ctype.startswith("text/html"):
        response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
