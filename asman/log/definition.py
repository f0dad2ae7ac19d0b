"""The job definition: validation, data references, the job id, and a typed view for workers.

A definition is JSON-model data in compute-queues' shape (reference/compute-queues.md §1):
``image`` or ``build``, ``command``, ``entrypoint``, ``env``, ``workdir``, ``shmSize``,
``inputs``, ``configFiles``, ``maxDuration``, ``tags``, ``requirements`` and the version tag
``v``. Unknown top-level keys are carried and ignored; ``null`` equals absent everywhere.
Asman extensions: ``command``/``entrypoint`` may be an argv list, ``build.buildArgs`` may be an
object, and a data reference may be of type ``blob`` (content-addressed by SHA-256).

The job id is the lower-case hex SHA-256 of the RFC 8785 (JCS) serialisation of the
canonical form, which is compute-queues' newer whitelist hash (§1.6 "[PCG] canonical form"),
so a plain definition gets the same id here as in compute-queues.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import shlex
import unicodedata
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal, NotRequired, TypedDict

import rfc8785

from asman.errors import InvalidDefinition, InvalidPath

if TYPE_CHECKING:
    from asman.log.steps import OutputPath, StepSpec

__all__ = [
    "DATAREF_TYPES",
    "DEFAULT_LIMITS",
    "BuildSpec",
    "DataRef",
    "DataRefJSON",
    "DataRefType",
    "DefinitionLimits",
    "JobSpec",
    "canonical_form",
    "image_class",
    "is_injected_env",
    "job_id",
    "parse_duration_ms",
    "parse_size_bytes",
    "split_command",
    "validate_definition",
    "validate_relative_path",
]

DataRefType = Literal["utf8", "base64", "json", "url", "key", "blob", "s3"]
DATAREF_TYPES: tuple[DataRefType, ...] = ("utf8", "base64", "json", "url", "key", "blob", "s3")
_INLINE_TYPES = frozenset({"utf8", "base64", "json"})

BUILD_KEYS = (
    "context",
    "buildContext",
    "filename",
    "target",
    "dockerfile",
    "buildArgs",
    "platform",
)
REQUIREMENT_KEYS = ("cpus", "gpus", "maxDuration", "memory")
_SCALAR_KEYS = ("v", "image", "command", "entrypoint", "workdir", "shmSize", "maxDuration", "tags")
# Asman's multi-step keys: in the canonical form only when a definition has them, so a
# definition without them keeps the id compute-queues gives it
_MULTISTEP_KEYS = ("steps", "volumes", "outputPaths")
# env keys an embedding page injects (compute-queues' isParentInjectedHashParamKey): not part
# of the job, so not part of its id
_LEGACY_INJECTED_ENV = frozenset(
    {"channel", "CHANNEL", "readonly", "edit", "parent-metapage-id", "fs-path"}
)
_S3_TEST_ORIGIN = "https://metaframe-asman-test.s3.us-west-1.amazonaws.com"
# absolute configFiles may not land on these (the first path segment): the worker's folders
# and the kernel's. Under the container's /tmp (a tmpfs) a file is bound over it, as GA4GH TES
# servers do (Snakemake's TES executor puts its job script at /tmp/run_snakemake.sh); /tmp
# itself stays the tmpfs.
_RESERVED_ROOTS = frozenset({"inputs", "outputs", "proc", "sys", "dev"})
#: files the container runtime itself puts in every container (its init, its name files)
RESERVED_FILES = frozenset({"/sbin/docker-init", "/etc/hostname", "/etc/hosts", "/etc/resolv.conf"})
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_KIB = 1024


class DataRefJSON(TypedDict):
    """A data reference as it appears in a definition (``type`` defaults to ``utf8``)."""

    value: Any
    type: NotRequired[str]
    hash: NotRequired[str]
    size: NotRequired[int]


@dataclass(frozen=True, slots=True)
class DefinitionLimits:
    """Bounds on one definition. The defaults keep a definition well inside a NATS message."""

    max_definition_bytes: int = 256 * _KIB
    max_inline_bytes: int = 64 * _KIB
    max_total_inline_bytes: int = 192 * _KIB
    max_files: int = 1000
    max_env: int = 256
    max_duration_ms: int = 30 * 24 * 3600 * 1000
    max_size_bytes: int = 16 * 1024**4  # memory and shmSize: 16 TiB
    max_cpus: int = 1024
    max_gpus: int = 64


DEFAULT_LIMITS = DefinitionLimits()

# ---------------------------------------------------------------------------------------------
# small helpers


def _show(value: Any) -> str:
    """A short, JSON-looking rendering of a value for error messages."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "…"


def _key(parent: str, name: str) -> str:
    return f"{parent}[{json.dumps(name, ensure_ascii=False)}]"


def _is_int(value: Any) -> bool:
    """A JSON whole number: an int (not a bool) or an integral float such as ``2.0``."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value) and value.is_integer()


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


def _str(value: Any, field: str, *, nonempty: bool = True, nul_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise InvalidDefinition(field, f"must be a string, got {_show(value)}")
    if nonempty and not value:
        raise InvalidDefinition(field, "must not be empty")
    if not nul_ok and "\x00" in value:
        raise InvalidDefinition(field, "must not contain a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidDefinition(
            field, "must be valid Unicode (it holds a lone surrogate)"
        ) from None
    return value


def _mapping(value: Any, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidDefinition(field, f"must be an object, got {_show(value)}")
    for k in value:
        if not isinstance(k, str):
            raise InvalidDefinition(field, f"keys must be strings, got {_show(k)}")
    return value


def _without_nulls(value: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in value.items() if v is not None}


def _plain(value: Any) -> Any:
    """Mappings to dicts and sequences to lists, recursively, so JCS can serialise them."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if _is_list(value):
        return [_plain(v) for v in value]
    return value


def _json_bytes(value: Any) -> bytes:
    return json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=False
    ).encode()


def _uri_decode(text: str) -> str:
    """JavaScript's decodeURIComponent: strict UTF-8, '+' stays '+'."""
    return urllib.parse.unquote(text, errors="strict")


# ---------------------------------------------------------------------------------------------
# durations and sizes

_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
#: a number in a duration or a size has at most this many digits (a longer one is refused
#: before it becomes an integer too long to print)
_MAX_DIGITS = 18
_DURATION_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:([kmgtp])(i?)b?|b)?\s*", re.IGNORECASE)
_SIZE_POWER = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def parse_duration_ms(value: str | int, field: str) -> int:
    """A duration in milliseconds: ``"10s"``, ``"20m"``, ``"1h30m"``, ``"500ms"``, ``"2d"``, or
    a whole number of seconds. Units: ms, s, m, h, d; parts may carry decimals (``"1.5h"``)."""
    if _is_int(value) and not isinstance(value, str):
        if abs(value) >= 10**_MAX_DIGITS:
            raise InvalidDefinition(field, "is far too long: give at most 30 days")
        seconds = int(value)
        if seconds < 0:
            raise InvalidDefinition(field, f"must be a duration ≥ 0, got {_show(value)}")
        return seconds * 1000
    if not isinstance(value, str):
        raise InvalidDefinition(
            field, f'must be a duration such as "10m" or a number of seconds, got {_show(value)}'
        )
    text = value.strip()
    pos, total = 0, Decimal(0)
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            break
        if len(match.group(1)) > _MAX_DIGITS:
            raise InvalidDefinition(field, "is far too long: give at most 30 days")
        total += Decimal(match.group(1)) * _DURATION_UNIT_MS[match.group(2)]
        pos = match.end()
    if not text or pos != len(text):
        raise InvalidDefinition(
            field,
            f'must be a duration such as "30s", "20m", "1h30m" or "500ms" '
            f"(units ms, s, m, h, d), got {_show(value)}",
        )
    return int(total)


def parse_size_bytes(value: str | int, field: str) -> int:
    """A size in bytes: a whole number, or ``"64k"``, ``"512m"``, ``"2g"``, ``"2GiB"``,
    ``"512mb"``, ``"1t"``. Units are powers of 1024 whatever the spelling, as Docker reads
    them; case does not matter."""
    if _is_int(value) and not isinstance(value, str):
        if abs(value) >= 10**_MAX_DIGITS:
            raise InvalidDefinition(field, "is far too large: give at most 16 TiB")
        size = int(value)
        if size < 0:
            raise InvalidDefinition(field, f"must be a size ≥ 0, got {_show(value)}")
        return size
    if not isinstance(value, str):
        raise InvalidDefinition(
            field, f'must be a size such as "512m" or a number of bytes, got {_show(value)}'
        )
    match = _SIZE.fullmatch(value)
    if match is None:
        raise InvalidDefinition(
            field,
            f'must be a size such as "64k", "512m", "2g" or "2GiB" (units k, m, g, t, '
            f"p, powers of 1024), got {_show(value)}",
        )
    if len(match.group(1)) > _MAX_DIGITS:
        raise InvalidDefinition(field, "is far too large: give at most 16 TiB")
    unit = (match.group(2) or "").lower()
    return int(Decimal(match.group(1)) * 1024 ** _SIZE_POWER.get(unit, 0))


# ---------------------------------------------------------------------------------------------
# file names


def validate_relative_path(name: str, field: str) -> str:
    """Check a file name for inputs, configFiles or outputs: a relative POSIX path that stays
    inside its folder. Returns it unchanged; raises :class:`InvalidPath` saying why not."""
    if not isinstance(name, str):
        raise InvalidPath(repr(name), f"must be a string (in {field})")
    if name.startswith("/"):
        raise InvalidPath(
            name,
            f"is absolute: give a path relative to the folder, such as 'data/x.csv' (in {field})",
        )
    _check_path(name, name, field)
    return name


def _check_path(path: str, name: str, field: str) -> None:
    def bad(reason: str) -> InvalidPath:
        return InvalidPath(name, f"{reason} (in {field})")

    if not path:
        raise bad("is empty: give a relative path such as 'data/x.csv'")
    if "\\" in path:
        raise bad("contains a backslash: separate folders with '/'")
    for ch in path:
        category = unicodedata.category(ch)
        if category == "Cs":
            raise bad("is not valid Unicode (it holds a lone surrogate)")
        if category == "Cc":
            raise bad(f"contains the control character {ch!r}: use printable characters")
    total = len(path.encode())
    if total > 1024:
        raise bad(f"is {total} bytes long, over the limit of 1024")
    segments = path.split("/")
    if len(segments) > 32:
        raise bad(f"is {len(segments)} folders deep, over the limit of 32")
    for segment in segments:
        if not segment:
            raise bad("has an empty segment ('//' or a trailing '/')")
        if segment in (".", ".."):
            raise bad(f"has a {segment!r} segment: '.' and '..' are not allowed")
        if len(segment.encode()) > 255:
            raise bad(f"has a segment of {len(segment.encode())} bytes, over the limit of 255")


def _validate_config_name(name: str, field: str) -> str:
    """A configFile name: relative (under /inputs), or an absolute container path."""
    if not name.startswith("/"):
        return validate_relative_path(name, field)
    rest = name[1:]
    if not rest:
        raise InvalidPath(name, f"is the root folder '/': name a file under it (in {field})")
    _check_path(rest, name, field)
    root = rest.split("/", 1)[0]
    if root in _RESERVED_ROOTS:
        raise InvalidPath(
            name,
            f"is under /{root}, which the worker owns: absolute config files may not be under "
            f"/inputs, /outputs, /proc, /sys or /dev (in {field})",
        )
    if name == "/tmp":
        raise InvalidPath(
            name, f"is the container's own /tmp: name a file under it, e.g. /tmp/x (in {field})"
        )
    if name in RESERVED_FILES:
        raise InvalidPath(
            name, f"is a file the container runtime writes itself: choose another path (in {field})"
        )
    return name


def _check_no_clash(names: Mapping[str, str]) -> None:
    """``names`` maps a file path to the field that declares it: no path twice, and no path
    that is both a file and a folder of another file."""
    for path, where in names.items():
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in names:
                raise InvalidDefinition(
                    where, f"{parent!r} is a file ({names[parent]}), so it cannot be a folder here"
                )


# ---------------------------------------------------------------------------------------------
# data references


def _data_url_to_ref(text: str) -> DataRef | None:
    """compute-queues' ``dataUrlToDataRef`` (the "v2 dataref" form): ``data:`` URLs."""
    if not text.startswith("data:") or "," not in text:
        return None
    header, payload = text[5:].split(",", 1)
    params = [p.strip().lower() for p in header.split(";")]
    mime = params[0]

    def decoded() -> str:
        try:
            return _uri_decode(payload)
        except UnicodeDecodeError:
            return payload

    if mime == "text/x-uri":
        return DataRef("url", decoded())
    if "base64" in params[1:]:
        return DataRef("base64", payload)
    if mime == "application/json":
        try:
            return DataRef("json", json.loads(decoded()))
        except ValueError:
            return DataRef("utf8", decoded())
    return DataRef("utf8", decoded())


@dataclass(frozen=True, slots=True)
class DataRef:
    """One file's content: inline (``utf8``, ``base64``, ``json``) or by reference (``url``,
    ``key``, ``blob``). ``hash`` is an optional SHA-256 of the content (a cache key, not part
    of the job id); ``size`` an optional byte count."""

    type: DataRefType
    value: Any
    hash: str | None = None
    size: int | None = None

    @property
    def is_inline(self) -> bool:
        return self.type in _INLINE_TYPES

    @classmethod
    def from_json(cls, obj: Any, field: str) -> DataRef:
        """Parse ``{value, type?, hash?, size?}``, a ``data:`` URL, or a plain string (utf8).
        Unknown keys are ignored; ``null`` equals absent."""
        if isinstance(obj, str):
            parsed = _data_url_to_ref(obj)
            if parsed is None:
                return cls("utf8", obj)
            obj = parsed.to_json()
        if not isinstance(obj, Mapping):
            raise InvalidDefinition(
                field,
                f'must be a data reference {{"value": …, "type": …}} or a string, got {_show(obj)}',
            )
        ref = _without_nulls(obj)
        from asman.log.schema import check_data_ref  # the models build on this module

        check_data_ref(ref, field)
        size = ref.get("size")
        return cls(
            ref.get("type", "utf8"),
            ref["value"],
            ref.get("hash"),
            None if size is None else int(size),
        )

    def to_json(self) -> DataRefJSON:
        out: DataRefJSON = {"value": self.value, "type": self.type}
        if self.hash is not None:
            out["hash"] = self.hash
        if self.size is not None:
            out["size"] = self.size
        return out

    def inline_bytes(self) -> bytes:
        """The content of an inline ref. ``json`` is serialised compactly with sorted keys."""
        if self.type == "utf8":
            return str(self.value).encode()
        if self.type == "base64":
            return base64.b64decode(self.value)
        if self.type == "json":
            return _json_bytes(self.value)
        raise ValueError(f"a {self.type} data reference is not inline: fetch its content")


# ---------------------------------------------------------------------------------------------
# validation


def _check_ref_value(kind: str, value: Any, vfield: str) -> None:
    """The rule of a data reference's ``value``, by its ``type``."""
    if kind == "json":
        try:
            _json_bytes(value)
        except (TypeError, ValueError):
            raise InvalidDefinition(vfield, "must be a JSON value") from None
    elif kind in ("url", "key", "blob", "s3"):
        _str(value, vfield)
    else:
        _str(value, vfield, nonempty=False, nul_ok=True)
    if kind == "base64":
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidDefinition(
                vfield, "must be standard base64 (A-Z a-z 0-9 + /, '=' padding)"
            ) from None
    elif kind == "url":
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise InvalidDefinition(vfield, f"must be an http(s) URL, got {_show(value)}")
    elif kind == "s3":
        parts = urllib.parse.urlsplit(value)
        if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
            raise InvalidDefinition(vfield, f"must be an s3://bucket/key URL, got {_show(value)}")
        if "\\" in value or any(seg in (".", "..") for seg in parts.path.split("/")):
            raise InvalidDefinition(
                vfield, f"must not hold '.', '..' or '\\' segments, got {_show(value)}"
            )
    elif kind == "blob" and not _SHA256_HEX.fullmatch(value):
        raise InvalidDefinition(
            vfield, f"must be a SHA-256: 64 lower-case hex characters, got {_show(value)}"
        )


def _validate_argv(value: Any, field: str) -> None:
    if isinstance(value, str):
        try:
            shlex.split(value)
        except ValueError as exc:
            raise InvalidDefinition(field, f"cannot be split into arguments: {exc}") from None
        return
    if not _is_list(value):
        raise InvalidDefinition(
            field, f"must be a string or a list of strings (an argv), got {_show(value)}"
        )
    for i, arg in enumerate(value):
        _str(arg, f"{field}[{i}]", nonempty=False)


def _check_size(value: Any, field: str, limits: DefinitionLimits) -> int:
    size = parse_size_bytes(value, field)
    if size <= 0:
        raise InvalidDefinition(field, 'must be a size > 0, such as "512m"')
    if size > limits.max_size_bytes:
        raise InvalidDefinition(
            field, f"is {size} bytes, over the limit of {limits.max_size_bytes // 1024**4} TiB"
        )
    return size


def _check_duration(value: Any, field: str, limits: DefinitionLimits) -> int:
    ms = parse_duration_ms(value, field)
    if ms <= 0:
        raise InvalidDefinition(field, f"must be a duration > 0, got {_show(value)}")
    if ms > limits.max_duration_ms:
        raise InvalidDefinition(
            field,
            f"is {ms} ms, over the limit of {limits.max_duration_ms} ms "
            f"({limits.max_duration_ms // 86_400_000} days)",
        )
    return ms


def _validate_env(value: Any, limits: DefinitionLimits) -> dict[str, Any]:
    env = _without_nulls(_mapping(value, "env"))
    if len(env) > limits.max_env:
        raise InvalidDefinition(
            "env", f"has {len(env)} variables, over the limit of {limits.max_env}"
        )
    for k, v in env.items():
        if not k or "=" in k or "\x00" in k:
            raise InvalidDefinition(
                _key("env", k), "a variable name must not be empty or hold '=' or NUL"
            )
        if not (isinstance(v, str) and v.isascii() and "\x00" not in v):
            _str(v, _key("env", k), nonempty=False)  # the field's name only when needed
    return env


def _validate_refs(
    value: Any, field: str, names: dict[str, str], absolute: dict[str, str]
) -> tuple[dict[str, Any], list[tuple[str, DataRef]]]:
    refs: dict[str, Any] = {}
    parsed: list[tuple[str, DataRef]] = []
    for name, raw in _without_nulls(_mapping(value, field)).items():
        where = _key(field, name)
        if field == "configFiles":
            _validate_config_name(name, where)
        else:
            validate_relative_path(name, where)
        ref = DataRef.from_json(raw, where)
        parsed.append((where, ref))
        table = absolute if name.startswith("/") else names
        key = name.lstrip("/")
        if key in table:
            raise InvalidDefinition(where, f"the file is also declared in {table[key]}")
        table[key] = where
        refs[name] = _without_nulls(raw) if isinstance(raw, Mapping) else raw
    return refs, parsed


def validate_definition(
    d: Mapping[str, Any], limits: DefinitionLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Check a job definition. Returns it with ``null`` values removed and otherwise as given
    (it is stored verbatim); raises :class:`InvalidDefinition` (or :class:`InvalidPath` for a
    file name) naming the field and what is allowed."""
    if not isinstance(d, Mapping):
        raise InvalidDefinition("", f"a job definition must be a JSON object, got {_show(d)}")
    out = _without_nulls(_mapping(d, ""))
    from asman.log.schema import validate_with_model  # the models build on this module

    return validate_with_model(out, limits)


def _check_inline_and_size(
    out: dict[str, Any], refs: list[tuple[str, DataRef]], limits: DefinitionLimits
) -> None:
    """The limits on a whole definition: inline bytes per file and in all, and JSON size."""
    total = 0
    for where, ref in refs:
        if not ref.is_inline:
            continue
        size = len(ref.inline_bytes())
        if size > limits.max_inline_bytes:
            raise InvalidDefinition(
                where,
                f"inline content is {size} bytes, over the limit of {limits.max_inline_bytes} "
                f"bytes per file: store it as a blob and refer to it by sha256",
            )
        total += size
    if total > limits.max_total_inline_bytes:
        raise InvalidDefinition(
            "inputs",
            f"inline content of inputs and configFiles is {total} bytes in all, over the limit "
            f"of {limits.max_total_inline_bytes} bytes: store the large files as blobs",
        )
    try:
        encoded = json.dumps(out, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidDefinition("", f"the job definition is not JSON: {exc}") from None
    size = len(encoded.encode(errors="surrogatepass"))
    if size > limits.max_definition_bytes:
        raise InvalidDefinition(
            "",
            f"the job definition is {size} bytes as JSON, over the limit of "
            f"{limits.max_definition_bytes} bytes: store large inputs as blobs",
        )


# ---------------------------------------------------------------------------------------------
# job id


def _hash_url(url: str) -> str:
    """compute-queues' ``reduceUrlToHashVersion``: presigned and S3 query parts are not data."""
    if "/presignedurl/" in url:
        return url.split("/presignedurl/", 1)[0]
    if url.startswith(_S3_TEST_ORIGIN):
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))
    return url


def _hash_ref(ref: Any) -> Any:
    if isinstance(ref, str):
        parsed = _data_url_to_ref(ref) or DataRef("utf8", ref)
        ref = {"value": parsed.value, "type": parsed.type}
    if not isinstance(ref, Mapping):
        return _plain(ref)
    out: dict[str, Any] = {}
    if ref.get("value") is not None:
        out["value"] = _plain(ref["value"])
    if ref.get("type") is not None:
        out["type"] = ref["type"]
    if out.get("type") == "url" and isinstance(out.get("value"), str):
        out["value"] = _hash_url(out["value"])
    return out


def is_injected_env(key: str) -> bool:
    """An env key an embedding page injects (``mp-*``, ``mp_*``, legacy names): not job data."""
    return key.startswith(("mp-", "mp_")) or key in _LEGACY_INJECTED_ENV


def canonical_form(d: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a definition that makes up its id (compute-queues §1.6, "[PCG] canonical
    form"): a whitelist, with empty maps, nulls, ref hashes and injected env keys left out."""
    blob: dict[str, Any] = {}
    for key in _SCALAR_KEYS:
        if d.get(key) is not None:
            blob[key] = _plain(d[key])
    for key, allowed in (("build", BUILD_KEYS), ("requirements", REQUIREMENT_KEYS)):
        sub = d.get(key)
        if isinstance(sub, Mapping):
            kept = {k: _plain(sub[k]) for k in allowed if sub.get(k) is not None}
            if kept:
                blob[key] = kept
        elif sub is not None:
            blob[key] = _plain(sub)
    env = d.get("env")
    if isinstance(env, Mapping):
        kept = {k: _plain(v) for k, v in env.items() if v is not None and not is_injected_env(k)}
        if kept:
            blob["env"] = kept
    elif env is not None:
        blob["env"] = _plain(env)
    for key in ("inputs", "configFiles"):
        refs = d.get(key)
        if isinstance(refs, Mapping):
            kept = {k: _hash_ref(v) for k, v in refs.items() if v is not None}
            if kept:
                blob[key] = kept
        elif refs is not None:
            blob[key] = _plain(refs)
    for key in _MULTISTEP_KEYS:
        if d.get(key):
            blob[key] = _plain(d[key])
    return blob


_JS_SAFE_INT = 2**53 - 1


def _plain_json(value: Any) -> bool:
    """Whether ``value`` serialises the same with ``json.dumps(sort_keys=True)`` as with RFC
    8785: no floats (JCS writes numbers as ECMAScript does), integers JavaScript holds
    exactly, and ASCII keys (JCS sorts keys by UTF-16 code units, Python by code points;
    they agree on ASCII). Strings are escaped alike (quote, backslash and control
    characters only, lower-case hex)."""
    if isinstance(value, str) or value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return -_JS_SAFE_INT <= value <= _JS_SAFE_INT
    if isinstance(value, dict):
        return all(isinstance(k, str) and k.isascii() and _plain_json(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    return False


def _jcs(value: Any) -> bytes:
    """RFC 8785 (JCS) bytes of ``value``: the C JSON encoder when it gives the same bytes
    (``_plain_json``; a property test compares the two), the ``rfc8785`` library otherwise."""
    if _plain_json(value):
        try:
            return json.dumps(
                value, separators=(",", ":"), ensure_ascii=False, sort_keys=True
            ).encode()
        except UnicodeEncodeError:  # a lone surrogate: rfc8785 says what is wrong
            pass
    return rfc8785.dumps(value)


def job_id(d: Mapping[str, Any]) -> str:
    """Lower-case hex SHA-256 of the JCS (RFC 8785) form of :func:`canonical_form`. Needs only
    a mapping of JSON values, not a valid definition."""
    try:
        text = _jcs(canonical_form(d))
    except (rfc8785.CanonicalizationError, TypeError, ValueError) as exc:
        raise InvalidDefinition("", f"cannot compute the job id: {exc}") from None
    return hashlib.sha256(text).hexdigest()


def image_class(d: Mapping[str, Any]) -> str:
    """``"gpu"`` when the definition asks for GPUs, else ``"cpu"``: the dispatch class."""
    req = d.get("requirements")
    gpus = req.get("gpus") if isinstance(req, Mapping) else None
    return "gpu" if _is_number(gpus) and gpus is not None and gpus > 0 else "cpu"


# ---------------------------------------------------------------------------------------------
# typed view


_VAR = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def split_command(command: str | Sequence[str], env: Mapping[str, str]) -> tuple[str, ...]:
    """The argv of a ``command`` or ``entrypoint``.

    A list is used as given (exec form, no expansion). A string is split like a POSIX shell
    word list (``shlex``), after ``$VAR`` and ``${VAR}`` are replaced by the job's ``env``
    values outside single quotes, as compute-queues does; an expanded value stays one word, and
    a variable not in ``env`` is left as written. No shell runs: pipes, ``&&`` and redirects are
    plain words, so a command that needs them must be written ``sh -c '…'``.
    """
    if not isinstance(command, str):
        return tuple(command)
    out: list[str] = []
    quote: str | None = None
    i = 0
    while i < len(command):
        ch = command[i]
        if quote == "'":
            out.append(ch)
            quote = None if ch == "'" else quote
        elif ch == "\\":
            out.append(command[i : i + 2])
            i += 1
        elif ch in "'\"" and quote is None:
            quote = ch
            out.append(ch)
        elif ch == '"':
            quote = None
            out.append(ch)
        elif (
            ch == "$"
            and (match := _VAR.match(command, i))
            and ((name := match.group(1) or match.group(2)) in env)
        ):
            value = env[name]
            if quote == '"':
                out.append(value.replace("\\", "\\\\").replace('"', '\\"'))
            else:
                out.append(shlex.quote(value))
            i = match.end()
            continue
        else:
            out.append(ch)
        i += 1
    try:
        return tuple(shlex.split("".join(out)))
    except ValueError as exc:
        raise InvalidDefinition("command", f"cannot be split into arguments: {exc}") from None


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """How to build the job's image: a context URL and/or an inline Dockerfile."""

    context: str | None = None
    build_context: str | None = None
    filename: str | None = None
    target: str | None = None
    dockerfile: str | None = None
    build_args: dict[str, str] = field(default_factory=dict)
    platform: str | None = None

    @classmethod
    def from_json(cls, build: Mapping[str, Any]) -> BuildSpec:
        raw = build.get("buildArgs") or {}
        args: dict[str, str] = {}
        if isinstance(raw, Mapping):
            args.update(raw)
        else:
            for item in raw:
                name, _, value = str(item).partition("=")
                args[name] = value
        return cls(
            context=build.get("context"),
            build_context=build.get("buildContext"),
            filename=build.get("filename"),
            target=build.get("target"),
            dockerfile=build.get("dockerfile"),
            build_args=args,
            platform=build.get("platform"),
        )


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated definition in the types a worker uses. ``command``/``entrypoint`` are
    ``None`` when the image's own apply; ``max_duration_ms`` is the smaller of ``maxDuration``
    and ``requirements.maxDuration``."""

    image: str | None
    build: BuildSpec | None
    command: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    env: dict[str, str]
    workdir: str | None
    shm_size: int | None
    inputs: dict[str, DataRef]
    config_files: dict[str, DataRef]
    max_duration_ms: int | None
    tags: tuple[str, ...]
    cpus: float | None
    gpus: int
    memory: int | None
    v: int | None = None
    #: a multi-step job's steps (``asman.log.steps``); empty: one container, as always
    steps: tuple[StepSpec, ...] = ()
    volumes: tuple[str, ...] = ()
    output_paths: tuple[OutputPath, ...] = ()

    @property
    def image_class(self) -> str:
        return "gpu" if self.gpus > 0 else "cpu"

    @classmethod
    def from_definition(
        cls, d: Mapping[str, Any], limits: DefinitionLimits = DEFAULT_LIMITS
    ) -> JobSpec:
        """Validate ``d`` and build the typed view."""
        from asman.log.steps import OutputPath, StepSpec

        clean = validate_definition(d, limits)
        env: dict[str, str] = dict(clean.get("env", {}))
        req: Mapping[str, Any] = clean.get("requirements", {})
        durations = [
            parse_duration_ms(x, "maxDuration")
            for x in (clean.get("maxDuration"), req.get("maxDuration"))
            if x is not None
        ]

        def argv(key: str) -> tuple[str, ...] | None:
            if key not in clean:
                return None
            return split_command(clean[key], env) or None

        def refs(key: str) -> dict[str, DataRef]:
            return {n: DataRef.from_json(r, _key(key, n)) for n, r in clean.get(key, {}).items()}

        return cls(
            image=clean.get("image"),
            build=BuildSpec.from_json(clean["build"]) if "build" in clean else None,
            command=argv("command"),
            entrypoint=argv("entrypoint"),
            env=env,
            workdir=clean.get("workdir"),
            shm_size=parse_size_bytes(clean["shmSize"], "shmSize") if "shmSize" in clean else None,
            inputs=refs("inputs"),
            config_files=refs("configFiles"),
            max_duration_ms=min(durations) if durations else None,
            tags=tuple(clean.get("tags", ())),
            cpus=float(req["cpus"]) if "cpus" in req else None,
            gpus=int(req.get("gpus", 0)),
            memory=parse_size_bytes(req["memory"], "requirements.memory")
            if "memory" in req
            else None,
            v=int(clean["v"]) if "v" in clean else None,
            steps=tuple(
                StepSpec.from_json(i, s, env) for i, s in enumerate(clean.get("steps", ()))
            ),
            volumes=tuple(clean.get("volumes", ())),
            output_paths=tuple(OutputPath.from_json(o) for o in clean.get("outputPaths", ())),
        )
