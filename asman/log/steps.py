"""Multi-step jobs: ``steps``, ``volumes`` and ``outputPaths`` of a definition.

A definition may carry ``steps``: containers run in order, in one job, on one worker, sharing
the job's ``/inputs``, ``/outputs``, its absolute ``configFiles``, its ``volumes`` (folders at
absolute paths, writable, shared by every step) and the folders its ``outputPaths`` name. Each
step has its own ``image`` (the job's when left out), ``command``, ``entrypoint``, ``workdir``,
``env`` (over the job's), ``stdin``/``stdout``/``stderr`` redirected from and to files, and
``ignoreError``. A step that exits non-zero without ``ignoreError`` ends the job ``failed``
with that step's exit code; the steps after it do not run.

``outputPaths`` collects files outside ``/outputs`` (GA4GH TES puts outputs anywhere):
``{"path": "/data/out.txt"}`` (a file), ``{"path": "/data/res", "type": "directory"}``, or a
``path`` with wildcards (``*``, ``?``, ``[…]``) and a ``pathPrefix`` cut from each match. An
optional ``url`` (``s3://bucket/key``) says where the worker uploads it through its own S3
settings. The folder an output lies in is bound writable into every step.

Every path is absolute, normalised, and kept off what the worker or the kernel owns:
``/proc``, ``/sys``, ``/dev``, ``/inputs`` (``/outputs`` for output paths and redirects only),
``/tmp`` itself and the runtime's own files (``/sbin/docker-init``, ``/etc/hosts``…).

The canonical form (the job id) holds these keys only when a definition has them, so a
definition without them hashes exactly as before.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from asman.errors import InvalidDefinition, InvalidPath
from asman.log.definition import (
    RESERVED_FILES,
    _check_path,
    _is_list,
    _show,
    _str,
    split_command,
)

__all__ = [
    "MAX_STEPS",
    "STEP_KEYS",
    "OutputPath",
    "StepSpec",
    "container_output_name",
    "has_wildcards",
    "output_url",
    "rw_folders",
]

MAX_STEPS = 64
MAX_VOLUMES = 64
MAX_OUTPUT_PATHS = 256
STEP_KEYS = (
    "name",
    "image",
    "command",
    "entrypoint",
    "workdir",
    "env",
    "stdin",
    "stdout",
    "stderr",
    "ignoreError",
)
_NEVER = ("proc", "sys", "dev", "inputs")
_WILDCARD = re.compile(r"[*?\[]")


def has_wildcards(path: str) -> bool:
    return _WILDCARD.search(path) is not None


def _abs_path(
    value: Any, field: str, *, outputs_ok: bool, wildcards: bool = False, inputs_ok: bool = False
) -> str:
    """An absolute container path a job may use: normalised (no ``.``, ``..``, ``//``), not
    on the kernel's or the worker's folders, not a file the runtime writes."""
    path = _str(value, field)
    if not path.startswith("/"):
        raise InvalidPath(path, f"must be an absolute path such as '/data/x.txt' (in {field})")
    rest = path[1:]
    if not rest:
        raise InvalidPath(path, f"is the root folder '/': name a folder under it (in {field})")
    _check_path(rest, path, field)
    if not wildcards and has_wildcards(path):
        raise InvalidPath(path, f"may not hold wildcards (*, ?, [) (in {field})")
    root = rest.split("/", 1)[0]
    never: tuple[str, ...] = _NEVER if outputs_ok else (*_NEVER, "outputs")
    if inputs_ok:
        never = tuple(n for n in never if n != "inputs")
    if root in never or (root in ("inputs", "outputs") and rest == root):
        allowed = "a file under /outputs, " if outputs_ok else ""
        raise InvalidPath(
            path,
            f"is under /{root}, which the worker or the kernel owns: use {allowed}a volume or "
            f"another folder such as /data (in {field})",
        )
    if path == "/tmp":
        raise InvalidPath(path, f"is the container's own /tmp: use a folder under it (in {field})")
    if path in RESERVED_FILES:
        raise InvalidPath(
            path, f"is a file the container runtime writes itself: choose another (in {field})"
        )
    return path


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class OutputPath:
    """One ``outputPaths`` entry."""

    path: str
    type: Literal["file", "directory"] = "file"
    path_prefix: str | None = None
    url: str | None = None

    @property
    def folder(self) -> str:
        """The folder bound writable into the steps for this output."""
        if has_wildcards(self.path):
            fixed = self.path[: _WILDCARD.search(self.path).start()]  # type: ignore[union-attr]
            return fixed.rsplit("/", 1)[0] or "/"
        if self.type == "directory":
            return self.path
        return self.path.rsplit("/", 1)[0] or "/"

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> OutputPath:
        return cls(
            path=raw["path"],
            type=raw.get("type", "file"),
            path_prefix=raw.get("pathPrefix"),
            url=raw.get("url"),
        )


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One step, typed for the worker: ``image`` None runs the job's image."""

    index: int
    name: str
    image: str | None
    command: tuple[str, ...] | None
    entrypoint: tuple[str, ...] | None
    env: dict[str, str] = field(default_factory=dict)
    workdir: str | None = None
    stdin: str | None = None
    stdout: str | None = None
    stderr: str | None = None
    ignore_error: bool = False

    @classmethod
    def from_json(cls, index: int, raw: Mapping[str, Any], job_env: Mapping[str, str]) -> StepSpec:
        env = {**job_env, **raw.get("env", {})}

        def argv(key: str) -> tuple[str, ...] | None:
            if key not in raw:
                return None
            return split_command(raw[key], env) or None

        return cls(
            index=index,
            name=raw.get("name") or f"step {index + 1}",
            image=raw.get("image"),
            command=argv("command"),
            entrypoint=argv("entrypoint"),
            env=env,
            workdir=raw.get("workdir"),
            stdin=raw.get("stdin"),
            stdout=raw.get("stdout"),
            stderr=raw.get("stderr"),
            ignore_error=bool(raw.get("ignoreError", False)),
        )


def rw_folders(d: Mapping[str, Any]) -> list[str]:
    """The writable folders a validated definition binds into its steps: its volumes and
    the folders of its output paths (``/outputs`` aside, which is always there)."""
    out: list[str] = list(d.get("volumes", ()))
    for raw in d.get("outputPaths", ()):
        folder = OutputPath.from_json(raw).folder
        if not _inside(folder, "/outputs"):
            out.append(folder)
    return sorted(set(out))


def container_output_name(path: str) -> str:
    """The name a file collected at container ``path`` has among the job's outputs: its
    path under ``/outputs``, else the absolute path without its leading ``/``."""
    if path.startswith("/outputs/"):
        return path[len("/outputs/") :]
    return path.lstrip("/")


def output_url(out: OutputPath, path: str, root: str) -> str | None:
    """Where the file at container ``path`` goes, found under output ``out`` (``root``: the
    match of ``out.path`` it was found in, a file or a folder); None without a ``url``."""
    if out.url is None:
        return None
    if has_wildcards(out.path):
        prefix = out.path_prefix or ""
        rel = path[len(prefix) :] if path.startswith(prefix) else path.lstrip("/")
        return out.url.rstrip("/") + "/" + rel.lstrip("/")
    if path == root:
        return out.url
    return out.url.rstrip("/") + "/" + path[len(root) :].lstrip("/")


def _validate_url(value: Any, field: str) -> str:
    url = _str(value, field)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise InvalidDefinition(
            field, f"must be an s3://bucket/key URL the worker uploads to, got {_show(url)}"
        )
    if "\\" in url or any(seg in (".", "..") for seg in parts.path.split("/")):
        raise InvalidDefinition(field, f"must not hold '.', '..' or '\\' segments: {_show(url)}")
    return url


def _validate_volumes(value: Any) -> list[str]:
    if not _is_list(value):
        raise InvalidDefinition(
            "volumes", f'must be a list of absolute folders such as "/data", got {_show(value)}'
        )
    if len(value) > MAX_VOLUMES:
        raise InvalidDefinition(
            "volumes", f"has {len(value)} folders, over the limit of {MAX_VOLUMES}"
        )
    return [_abs_path(v, f"volumes[{i}]", outputs_ok=False) for i, v in enumerate(value)]
