"""A submission's ``control``: how the queue treats the job, never part of the job.

compute-queues sends ``{id, definition, control}`` (reference/compute-queues.md §1.5):
``control`` holds the client's ``namespace`` and its ``callbacks`` (webhooks), and is not
hashed, so the same definition is the same job whatever its control says. Asman stores the
checked control in the job's ``submitted`` event (and in a ``requeued`` by the submitter),
where the peer that finishes the job reads its ``finished`` callback.

Its ``namespace`` is the one the job is held for (``asman.log.namespaces``; this module
holds the namespace rules, which ``asman.log.events`` re-exports): a submission may name it
beside the control too (the HTTP API's ``namespace``, ``submit --namespace``), and
``with_namespace`` makes the two one, or refuses two different ones. ``control_text`` is how
events carry a control, so that a key signing an event another peer prepared signs the very
text that peer would write.

The control is on the log, readable by whoever knows the queue: a callback URL or payload
must hold no secret. A receiver trusts a callback by its signature (``asman.peer.callbacks``).
"""

from __future__ import annotations

import json
import math
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asman.errors import InvalidInput

__all__ = [
    "ALL_NAMESPACES",
    "CALLBACK_EVENTS",
    "DEFAULT_NAMESPACE",
    "MAX_CONTROL_BYTES",
    "MAX_NAMESPACE",
    "MAX_URL_LENGTH",
    "Callback",
    "callback_of",
    "control_text",
    "namespace_of",
    "validate_control",
    "validate_namespace",
    "with_namespace",
]

#: the callbacks Asman sends: compute-queues declares both and sends only ``queued``
CALLBACK_EVENTS = ("queued", "finished")
MAX_CONTROL_BYTES = 16 * 1024
MAX_URL_LENGTH = 2048
#: compute-queues' default namespace: the one a job is held by when its submission names none
DEFAULT_NAMESPACE = "_"
#: in a cancel, every namespace (the ones the signer may remove)
ALL_NAMESPACES = "*"
MAX_NAMESPACE = 256


def validate_namespace(value: object, *, allow_all: bool = False) -> str:
    """A namespace as compute-queues takes it (``control.namespace``, ``?namespace=``): any
    text of 1 to 256 characters without control characters. ``*`` means every namespace,
    so it names one only in a cancel (``allow_all``)."""
    if not isinstance(value, str):
        raise InvalidInput(f"a namespace must be text, got {type(value).__name__}")
    if not 1 <= len(value) <= MAX_NAMESPACE:
        raise InvalidInput(
            f"namespace {value[:40]!r} must be 1 to {MAX_NAMESPACE} characters long, "
            f"not {len(value)}"
        )
    if any(ord(c) < 32 or 127 <= ord(c) < 160 or 0xD800 <= ord(c) < 0xE000 for c in value):
        raise InvalidInput(f"namespace {value[:40]!r} holds a control character: remove it")
    if value == ALL_NAMESPACES and not allow_all:
        raise InvalidInput(
            "namespace '*' means every namespace: it can cancel, not hold a job; "
            "submit with another name"
        )
    return value


# compute-queues declares these and never reads them: accepted, not kept
_IGNORED = frozenset({"maxDuration", "outputs"})


@dataclass(frozen=True, slots=True)
class Callback:
    """One webhook: POST to ``url``; ``payload`` comes back as the body's ``config``."""

    url: str
    payload: Any = None


def _bad(where: str, what: str) -> InvalidInput:
    return InvalidInput(f"control{where} {what}")


def _check_json(value: Any, where: str, depth: int = 0) -> None:
    """JSON-model data only (no NaN or infinities), at most 32 levels deep."""
    if depth > 32:
        raise _bad(where, "is nested more than 32 levels deep")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _bad(where, "holds a number JSON cannot carry (NaN or infinity)")
        return
    if isinstance(value, list):
        for item in value:
            _check_json(item, where, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _bad(where, "has a key that is not text")
            _check_json(item, where, depth + 1)
        return
    raise _bad(where, f"holds a {type(value).__name__}, which is not JSON")


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, "must be an http:// or https:// URL (a JSON string)")
    if len(value) > MAX_URL_LENGTH:
        raise _bad(where, f"is {len(value)} characters long, over the limit of {MAX_URL_LENGTH}")
    try:
        url = urllib.parse.urlsplit(value)
        host = url.hostname
        url.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise _bad(where, f"is not a URL: {exc}") from None
    if url.scheme not in ("http", "https") or not host or any(c.isspace() for c in value):
        raise _bad(where, f"must be an absolute http:// or https:// URL, got {value[:200]!r}")
    return value


def _callback(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise _bad(where, 'must be an object {"url": "https://…", "payload": …}')
    unknown = set(value) - {"url", "payload"}
    if unknown:
        raise _bad(where, f"has unknown fields {sorted(unknown)}: a callback has url and payload")
    out: dict[str, Any] = {"url": _url(value.get("url"), f"{where}.url")}
    if value.get("payload") is not None:
        out["payload"] = value["payload"]
    return out


def validate_control(value: Any) -> dict[str, Any]:
    """The checked control: ``{"namespace"?, "callbacks"?: {"queued"?, "finished"?}}``,
    each callback ``{"url", "payload"?}``. ``null`` or ``{}`` gives ``{}``. compute-queues'
    declared but unused fields (``maxDuration``, ``outputs``) are accepted and dropped;
    anything else is an ``InvalidInput`` that names the field."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _bad(
            "",
            'must be an object such as {"namespace": "…", "callbacks": {"finished": {"url": …}}}',
        )
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError) as exc:
        raise _bad("", f"is not JSON: {exc}") from None
    if size > MAX_CONTROL_BYTES:
        raise _bad("", f"is {size} bytes of JSON, over the limit of {MAX_CONTROL_BYTES}")
    _check_json(value, "")
    unknown = set(value) - {"namespace", "callbacks"} - _IGNORED
    if unknown:
        raise _bad("", f"has unknown fields {sorted(unknown)}: it may hold namespace and callbacks")
    out: dict[str, Any] = {}
    namespace = value.get("namespace")
    if namespace is not None:
        try:
            out["namespace"] = validate_namespace(namespace)
        except InvalidInput as exc:
            raise _bad(".namespace", f"is not a namespace: {exc}") from None
    callbacks = value.get("callbacks")
    if callbacks is not None:
        if not isinstance(callbacks, Mapping):
            raise _bad(".callbacks", 'must be an object {"queued": {…}, "finished": {…}}')
        unknown = set(callbacks) - set(CALLBACK_EVENTS)
        if unknown:
            raise _bad(
                ".callbacks",
                f"has unknown callbacks {sorted(unknown)}: Asman sends queued and finished",
            )
        checked = {
            event: _callback(callbacks[event], f".callbacks.{event}")
            for event in CALLBACK_EVENTS
            if callbacks.get(event) is not None
        }
        if checked:
            out["callbacks"] = checked
    return out


def callback_of(control: Mapping[str, Any], event: str) -> Callback | None:
    """The ``event`` callback of a checked control (None when it has none)."""
    callbacks = control.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return None
    entry = callbacks.get(event)
    if not isinstance(entry, Mapping) or not isinstance(entry.get("url"), str):
        return None
    return Callback(entry["url"], entry.get("payload"))


def namespace_of(control: Mapping[str, Any]) -> str:
    """The control's namespace, compute-queues' ``_`` when it names none."""
    namespace = control.get("namespace")
    return namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE


def control_text(checked: Mapping[str, Any]) -> str:
    """A checked control as events carry it: JSON text with sorted keys, so that every peer
    writes one control the same way (a browser signs the event the gateway prepared, and
    the gateway checks it is the very event it would write)."""
    return json.dumps(checked, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def with_namespace(control: Any, namespace: str | None) -> tuple[dict[str, Any], str | None]:
    """The checked control and the submission's namespace, from a ``namespace`` given beside
    the control (the API's ``namespace``, ``submit --namespace``) and the control's own:
    when one of them names it, it is both; when both do and differ, ``InvalidInput`` says
    so. The namespace is None when neither names one (the default, ``_``)."""
    checked = validate_control(control)
    inner = checked.get("namespace")
    if namespace is None:
        return checked, inner
    validate_namespace(namespace)
    if inner is not None and inner != namespace:
        raise InvalidInput(
            f"namespace {namespace[:40]!r} and control.namespace {inner[:40]!r} differ: "
            "name the namespace once, or the same in both"
        )
    return {**checked, "namespace": namespace}, namespace
