"""Events signed by the submitter's own key (a browser's WebCrypto Ed25519 key) through the
gateway: documented in docs/reference/http-api.md and /openapi.json.

The gateway never holds that key. It prepares the event and the exact bytes to sign, and
forgets them (it is stateless); the client signs and sends back the envelope's parts; the
gateway verifies them as any reader of the log would, checks that they are the very event it
would append itself (a ``submitted`` of a definition within its limits and with its ``via``,
or a ``cancel``), and appends them by compare-and-set through ``asman.log.jobs``:

* ``POST …/queues/{queue}/jobs/prepare`` ``{definition, key, namespace?, control?}``: the
  submission to sign, with its namespace and control (callbacks) in the event, as a plain
  submission writes them;
* ``POST …/queues/{queue}/jobs/{job}/cancel/prepare`` ``{key, message?}``: the cancel to sign
  (``403`` when that key did not submit the job);
* ``POST …/queues/{queue}/jobs/{job}/signed`` ``{protected, payload, signature}``: append it.
  ``409`` when the job moved on since the prepare: prepare and sign again.

The gateway appended it, so the gateway sends the callbacks of what it appended: the
``queued`` of a signed submission, the ``finished`` of a job a signed cancel ended.

Bytes travel as base64url without padding; ``key`` is the public key as a peer id (64
lower-case hex digits).
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any

from aiohttp import web

from asman.errors import BadSignature, EnvelopeError, InvalidInput, WrongSubject
from asman.gateway.api import (
    PREFIX,
    cancel_and_notify,
    check_message,
    job_base,
    job_param,
    queue_param,
    submit_definition,
    submitted_response,
)
from asman.gateway.limits import parse_json, read_json
from asman.gateway.state import CONFIG, LOG
from asman.gateway.views import job_view
from asman.log import jobs, subjects
from asman.log.control import with_namespace
from asman.log.definition import job_id, validate_definition
from asman.log.keys import PUBLIC_KEY_SIZE

__all__ = ["add_routes", "b64url", "unb64url"]

DEFAULT_MESSAGE = "cancelled by its submitter through the gateway"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_HEX_KEY = re.compile(rf"[0-9a-f]{{{2 * PUBLIC_KEY_SIZE}}}")
_PARTS = ("protected", "payload", "signature")


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 4648 §5), as the page reads it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(value: Any, name: str) -> bytes:
    """The bytes of a base64url text (padding optional); ``InvalidInput`` naming ``name``."""
    if not isinstance(value, str) or not _B64URL.fullmatch(value.rstrip("=")):
        raise InvalidInput(f"{name} must be base64url text (A-Z a-z 0-9 - _), got {_show(value)}")
    text = value.rstrip("=")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{name} is not valid base64url ({len(text)} characters)") from None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value[:20] + ("…" if len(value) > 20 else ""))
    return type(value).__name__ if value is not None else "nothing"


def _key(value: Any) -> str:
    if not isinstance(value, str) or not _HEX_KEY.fullmatch(value):
        raise InvalidInput(
            "key must be your Ed25519 public key as 64 lower-case hex digits (its 32 raw "
            f"bytes), got {_show(value)}"
        )
    return value


def _body(raw: Any, allowed: tuple[str, ...], shape: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"the body must be a JSON object: {shape}")
    unknown = set(raw) - set(allowed)
    if unknown:
        raise InvalidInput(
            f"unknown body fields: {', '.join(sorted(unknown))[:200]}; the body is {shape}"
        )
    return raw


def _prepared_view(prepared: jobs.Prepared) -> dict[str, Any]:
    base = job_base(prepared.queue, prepared.job_id)
    return {
        "queue": prepared.queue,
        "jobId": prepared.job_id,
        "subject": prepared.subject,
        "signer": prepared.signer,
        "event": prepared.event,
        "protected": b64url(prepared.unsigned.protected),
        "payload": b64url(prepared.unsigned.payload),
        "toSign": b64url(prepared.unsigned.data),
        "commit": f"{base}/signed",
    }


async def prepare_submit(request: web.Request) -> web.Response:
    queue = queue_param(request)
    config = request.app[CONFIG]
    body = _body(
        await read_json(request, config.limits.max_body_bytes),
        ("definition", "key", "namespace", "control"),
        '{"definition": {...}, "key": "<your public key, hex>", "namespace": "...", '
        '"control": {...}}',
    )
    key = _key(body.get("key"))
    definition = body.get("definition")
    if not isinstance(definition, dict):
        raise InvalidInput('the body needs "definition": a job definition (a JSON object)')
    clean = validate_definition(definition, config.limits.definition_limits())
    control, namespace = with_namespace(body.get("control"), body.get("namespace"))
    prepared = await jobs.prepare_submit(
        request.app[LOG],
        queue,
        clean,
        signer=key,
        via=config.name,
        namespace=namespace,
        control=control,
    )
    return web.json_response(_prepared_view(prepared))


async def prepare_cancel(request: web.Request) -> web.Response:
    queue, job = queue_param(request), job_param(request)
    body = _body(
        await read_json(request, request.app[CONFIG].limits.max_body_bytes),
        ("key", "message"),
        '{"key": "<your public key, hex>", "message": "..."}',
    )
    key = _key(body.get("key"))
    message = DEFAULT_MESSAGE if body.get("message") is None else check_message(body["message"])
    prepared = await jobs.prepare_cancel(request.app[LOG], queue, job, message, signer=key)
    return web.json_response(_prepared_view(prepared))


async def commit(request: web.Request) -> web.Response:
    queue, job = queue_param(request), job_param(request)
    config = request.app[CONFIG]
    body = _body(
        await read_json(request, config.limits.max_body_bytes),
        _PARTS,
        '{"protected": "…", "payload": "…", "signature": "…"} (base64url, from the prepare)',
    )
    missing = [name for name in _PARTS if name not in body]
    if missing:
        raise InvalidInput(
            f"the body lacks {', '.join(missing)}: send the prepare's protected and payload, "
            "and your signature of its toSign"
        )
    protected, payload, signature = (unb64url(body[name], name) for name in _PARTS)
    subject = subjects.job_subject(queue, job)
    try:
        signed = jobs.SignedEvent.verify(protected, payload, signature, subject)
    except WrongSubject:
        raise WrongSubject(
            f"the signed event is for another subject (job or queue) than {subject}: send "
            "it to the route of the job it was prepared for"
        ) from None
    except BadSignature as exc:
        raise BadSignature(f"the signed event does not verify: {exc}") from None
    except EnvelopeError as exc:
        raise type(exc)(f"the signed event is not valid: {exc}") from None

    if signed.kind == "submitted":
        text = signed.opened.event.get("definition")
        if not isinstance(text, str):
            raise InvalidInput("the signed submission has no definition (JSON text)")
        definition = parse_json(text, what="the signed definition")
        if not isinstance(definition, dict):
            raise InvalidInput("the signed definition is not a JSON object")
        clean = validate_definition(definition, config.limits.definition_limits())
        computed = job_id(clean)
        if computed != job:
            raise InvalidInput(
                f"the signed definition hashes to job {computed}, not to job {job} of this "
                "route: send it to its own job's route"
            )
        # the namespace and control it signed: the submission is checked to be the very
        # event the gateway writes with them
        event = signed.opened.event
        control = event.get("control")
        if control is not None:
            if not isinstance(control, str):
                raise InvalidInput("the signed submission's control is not JSON text")
            control = parse_json(control, what="the signed control")
        submitted = await submit_definition(
            request,
            queue,
            clean,
            signed=signed,
            namespace=event.get("namespace"),
            control=control,
        )
        return submitted_response(submitted)
    if signed.kind == "cancel":
        message = check_message(signed.opened.event.get("message"))
        state = await cancel_and_notify(request, queue, job, message, signed=signed)
        return web.json_response(job_view(state, job_base(queue, job), history=False))
    raise InvalidInput(
        f"only submitted or cancel events may be signed through the gateway, not "
        f"{signed.kind[:40]!r}: the job's workers write the others"
    )


def add_routes(app: web.Application) -> None:
    r = app.router
    q = f"{PREFIX}/queues/{{queue}}"
    j = f"{q}/jobs/{{job}}"
    r.add_post(f"{q}/jobs/prepare", prepare_submit)
    r.add_post(f"{j}/cancel/prepare", prepare_cancel)
    r.add_post(f"{j}/signed", commit)
