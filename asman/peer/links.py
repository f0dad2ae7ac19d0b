"""Browser links in compute-queues' URL-hash format (reference/compute-queues.md §2).

A link is ``<base>/#?key=value&…`` with the keys sorted, as ``@metapages/hash-query`` writes
them. JSON parameters (``job``, ``inputs``, ``control``, ``definition``) hold
``base64(encodeURIComponent(stable JSON))``; the base64 padding is written ``%3D``. ``job`` is
the definition without ``inputs``; the ``inputs`` parameter maps file names to text, which the
browser turns into ``configFiles`` utf8 refs; any other parameter is merged into ``env``.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

import rfc8785

from asman.errors import InvalidDefinition, InvalidInput
from asman.log.definition import is_injected_env

__all__ = [
    "SYSTEM_PARAMS",
    "decode_hash_param",
    "encode_hash_param",
    "encode_uri_component",
    "job_link",
    "parse_link",
]

# app/browser/public/metaframe.json `hashParams`: never merged into env
SYSTEM_PARAMS = frozenset(
    {
        "allowsetjob",
        "autostart",
        "config",
        "control",
        "debug",
        "definition",
        "ignoreQueueOverride",
        "inputs",
        "job",
        "maxJobDuration",
        "queue",
        "queueOverride",
        "resolverefs",
        "terminal",
    }
)
_JSON_PARAMS = frozenset({"job", "inputs", "control", "definition"})
# what encodeURIComponent leaves alone, besides ASCII letters and digits
_URI_SAFE = "-_.!~*'()"
_URI_ENCODED = re.compile(r"[A-Za-z0-9\-_.!~*'()%]*")
_SHORT_PATH = re.compile(r"/j/([^/]+?)(?:\.json)?/?$")


def _utf16_key(key: str) -> bytes:
    """Sort key of JavaScript's default sort: UTF-16 code units."""
    return key.encode("utf-16-be", errors="surrogatepass")


def encode_uri_component(text: str) -> str:
    """JavaScript's ``encodeURIComponent``: UTF-8, upper-case hex, ``A-Za-z0-9-_.!~*'()`` kept."""
    try:
        return urllib.parse.quote(text, safe=_URI_SAFE, errors="strict")
    except UnicodeEncodeError:
        raise InvalidInput("text holds a lone surrogate, which a URL cannot carry") from None


def _stable_json(obj: Any) -> str:
    """``fast-json-stable-stringify``: sorted keys, no spaces, numbers as JavaScript writes them
    (RFC 8785 gives exactly that)."""
    try:
        return rfc8785.dumps(obj).decode()
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidInput(f"cannot put this value in a link: {exc}") from None


def encode_hash_param(obj: Any) -> str:
    """A JSON hash parameter as it appears after ``key=`` in the link:
    ``base64(encodeURIComponent(stable JSON))`` with ``=`` written ``%3D``."""
    raw = base64.b64encode(encode_uri_component(_stable_json(obj)).encode("ascii")).decode()
    return raw.replace("=", "%3D")


def decode_hash_param(s: str) -> Any:
    """Read a JSON hash parameter: ``base64(encodeURIComponent(json))``, with ``=`` or ``%3D``
    padding (or none), or the single-encoded ``base64(json)`` that newer writers produce."""
    text = urllib.parse.unquote(s).strip()
    try:
        raw = base64.b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"hash parameter {_short(s)} is not base64") from None
    try:
        decoded = raw.decode("ascii")
        if _URI_ENCODED.fullmatch(decoded):
            decoded = urllib.parse.unquote(decoded, errors="strict")
    except UnicodeDecodeError:
        # single-encoded and not ASCII: UTF-8, or the Latin-1 that btoa() works in
        try:
            decoded = raw.decode()
        except UnicodeDecodeError:
            decoded = raw.decode("latin-1")
    try:
        return json.loads(decoded)
    except ValueError:
        raise InvalidInput(f"hash parameter {_short(s)} does not hold JSON") from None


def _short(s: str) -> str:
    return repr(s if len(s) <= 40 else s[:37] + "…")


def _encode_plain(value: str) -> str:
    """A plain hash parameter value: escape only what would break the hash query."""
    return urllib.parse.quote(value, safe=_URI_SAFE + ":/@,;$+?")


def job_link(
    base_url: str,
    definition: Mapping[str, Any],
    queue: str | None = None,
    inputs: Mapping[str, str] | None = None,
) -> str:
    """The browser link that loads ``definition`` (and runs it on ``queue``).

    ``job`` carries the definition without ``inputs``: the browser takes a job's inputs from
    its metaframe inputs, so a definition with ``inputs`` gives a link to a different job.
    ``inputs`` (file name → text) become the browser's ``configFiles``, and the browser then
    ignores ``job.configFiles``; so the definition's configFiles move into the ``inputs``
    parameter when they are all ``{"type": "utf8", "value": str}`` refs (which keeps the job
    id), and stay in ``job`` otherwise. ``inputs`` wins over a configFile of the same name.
    """
    job = {k: v for k, v in definition.items() if k != "inputs" and v is not None}
    files: dict[str, str] = {}
    config = job.get("configFiles")
    if isinstance(config, Mapping) and config and all(_is_plain_utf8(r) for r in config.values()):
        files = {name: ref["value"] for name, ref in config.items()}
        del job["configFiles"]
    if inputs:
        if job.get("configFiles"):
            raise InvalidDefinition(
                "configFiles",
                "cannot go in a link together with an `inputs` parameter: the browser replaces "
                "configFiles with it, and these are not all plain utf8 text",
            )
        files.update(inputs)
    params: dict[str, str] = {"job": encode_hash_param(job)}
    if files:
        params["inputs"] = encode_hash_param(files)
    if queue is not None:
        params["queue"] = _encode_plain(queue)
    query = "&".join(f"{k}={params[k]}" for k in sorted(params, key=_utf16_key))
    base = base_url.split("#", 1)[0].rstrip("/")
    return f"{base}/#?{query}"


def _is_plain_utf8(ref: Any) -> bool:
    return (
        isinstance(ref, Mapping)
        and set(ref) == {"type", "value"}
        and ref["type"] == "utf8"
        and isinstance(ref["value"], str)
    )


def _hash_params(url: str) -> dict[str, str]:
    fragment = url.split("#", 1)[1] if "#" in url else ""
    fragment = fragment.lstrip("#")
    if "?" not in fragment:
        return {}
    params: dict[str, str] = {}
    for part in fragment.split("?", 1)[1].split("&"):
        if part:
            key, _, value = part.partition("=")
            params[key] = value
    return params


def parse_link(url: str) -> tuple[dict[str, Any], str | None]:
    """Rebuild the definition a browser would submit from a link, and the queue it names.

    As the browser does: ``inputs`` entries become ``configFiles`` utf8 refs (replacing the
    job's configFiles), other non-system parameters are merged into ``env`` (those an
    embedding page injects excepted), and ``${KEY}`` in ``command`` and ``build.context`` is
    replaced by their values. ``queueOverride`` wins over ``queue`` unless
    ``ignoreQueueOverride=true``. Empty maps are left out. The definition is not validated.
    """
    params = _hash_params(url)
    if "job" not in params:
        path = urllib.parse.urlsplit(url.split("#", 1)[0]).path
        short = _SHORT_PATH.search(path)
        if short:
            raise InvalidInput(
                f"link {url} is the short form: fetch the definition from "
                f"/j/{short.group(1)}/definition.json"
            )
        raise InvalidInput(f"link {url} has no `job` parameter in its hash (#?job=…)")
    values: dict[str, str] = {}
    for key, raw in params.items():
        if key in _JSON_PARAMS:
            continue
        try:
            values[key] = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            values[key] = raw
    job = decode_hash_param(params["job"])
    if not isinstance(job, dict):
        raise InvalidInput("the link's `job` parameter is not a JSON object")
    definition: dict[str, Any] = dict(job)
    definition.pop("inputs", None)

    # parameters an embedding page injects (mp-*, legacy names) are never merged into env
    extra = {k: v for k, v in values.items() if k not in SYSTEM_PARAMS and not is_injected_env(k)}
    env = definition.get("env")
    env = {**(env if isinstance(env, Mapping) else {}), **extra}
    if env:
        definition["env"] = env
    else:
        definition.pop("env", None)
    for key, value in extra.items():
        if isinstance(definition.get("command"), str):
            definition["command"] = definition["command"].replace("${" + key + "}", value, 1)
        build = definition.get("build")
        if isinstance(build, dict) and isinstance(build.get("context"), str):
            definition["build"] = build = dict(build)
            build["context"] = build["context"].replace("${" + key + "}", value, 1)

    if params.get("inputs"):
        files = decode_hash_param(params["inputs"])
        if not isinstance(files, dict):
            raise InvalidInput("the link's `inputs` parameter is not a JSON object")
        definition["configFiles"] = {k: {"type": "utf8", "value": v} for k, v in files.items()}
    if not definition.get("configFiles"):
        definition.pop("configFiles", None)

    queue = values.get("queue") or None
    if values.get("queueOverride") and values.get("ignoreQueueOverride") != "true":
        queue = values["queueOverride"]
    return definition, queue
