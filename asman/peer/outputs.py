"""What a finished job leaves: its output files and its logs, as the ``finished`` event's
manifest.

Output files are listed without ever following a symlink out of the outputs folder; only
regular files with a valid relative path count, up to a number of files and a total size.
Each is carried inside the event when small (``inline_limit``, up to ``inline_total`` for the
job), else stored in the blob store by its sha256 (skipped when already there). Whatever is
skipped is said in the job's log (``note``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asman.errors import InvalidInput
from asman.escape import one_line
from asman.log import wire
from asman.log.blobs import BlobStore
from asman.log.definition import validate_relative_path
from asman.log.events import Blob, OutputFile, Result, parse_outputs

__all__ = [
    "MANIFEST_INLINE_LIMIT",
    "OutputLimits",
    "Outputs",
    "list_outputs",
    "load_outputs",
    "manifest_fields",
    "store_blob",
    "store_outputs",
]

#: An outputs list whose encoding is larger than this goes into a blob of its own, so that a
#: ``finished`` event always fits in one message.
MANIFEST_INLINE_LIMIT = 128 * 1024
#: A manifest blob is read up to this size (10,000 outputs with long paths and inline data).
MANIFEST_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class OutputLimits:
    max_files: int
    max_bytes: int
    inline_limit: int  # a file this small is carried inside the event
    inline_total: int  # up to this much inline per job


#: at most this many skipped outputs are named in the job's log; the rest are counted
MAX_SKIPPED_NAMED = 100


@dataclass(slots=True)
class Outputs:
    files: list[tuple[str, Path, int]] = field(default_factory=list)  # (rel, path, size)
    skipped: list[str] = field(default_factory=list)
    skipped_more: int = 0  # skipped beyond MAX_SKIPPED_NAMED

    def skip(self, rel: str, why: str) -> None:
        if len(self.skipped) < MAX_SKIPPED_NAMED:
            self.skipped.append(f"{one_line(rel)} ({why})")
        else:
            self.skipped_more += 1


def _not_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return True
    return False


def list_outputs(root: Path, limit: int) -> Outputs:
    """Regular files under ``root``, never following a symlink. The walk keeps its own stack
    (a job's tree may be deeper than Python's recursion), and a folder it cannot read (a
    path past the system's length limit, no permission) is skipped and said so."""
    out = Outputs()
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(root / rel_dir if rel_dir else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            out.skip(f"{rel_dir}/", f"cannot be read: {exc.strerror or exc}")
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as exc:
                out.skip(rel, f"cannot be read: {exc.strerror or exc}")
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
                continue
            if stat.S_ISLNK(st.st_mode):
                out.skip(rel, "a symlink")
                continue
            if not stat.S_ISREG(st.st_mode):
                out.skip(rel, "not a regular file")
                continue
            if _not_utf8(rel):
                out.skip(rel, "its name is not UTF-8")
                continue
            try:
                validate_relative_path(rel, "outputs")
            except InvalidInput as exc:
                out.skip(rel, str(exc))
                continue
            if len(out.files) >= limit:
                out.skip(rel, f"more than {limit} output files")
                continue
            out.files.append((rel, Path(entry.path), st.st_size))
        pending.extend(reversed(subdirs))
    out.files.sort()
    return out


async def store_blob(blobs: BlobStore, content: bytes | Path, *, inline: bool) -> Blob:
    """``content`` (bytes, or a file's) carried inside the ``finished`` event, or uploaded to
    the blob store (by sha256, skipped when already there)."""
    if inline:
        if isinstance(content, bytes):
            data = content
        else:
            data = await asyncio.to_thread(content.read_bytes)
        return Blob(size=len(data), sha256=hashlib.sha256(data).hexdigest(), data=data)
    if isinstance(content, bytes):
        info = await blobs.put_bytes(content)
    else:
        info = await blobs.put_file(content)
    return Blob(size=info.size, sha256=info.sha256, key=info.key)


async def store_outputs(
    blobs: BlobStore,
    outputs_dir: Path | None,
    limits: OutputLimits,
    note: Callable[[str], None],
) -> list[dict[str, Any]]:
    """The manifest of the files under ``outputs_dir`` (none when None), each stored."""
    files = Outputs()
    if outputs_dir is not None:
        files = await asyncio.to_thread(list_outputs, outputs_dir, limits.max_files)
    for skipped in files.skipped:
        note(f"output {skipped} skipped")
    if files.skipped_more:
        note(f"{files.skipped_more} more outputs skipped")
    manifest = []
    inline_total = 0
    total = 0
    for rel, path, size in files.files:
        total += size
        if total > limits.max_bytes:
            note(f"outputs over {limits.max_bytes} bytes; the rest dropped")
            break
        inline = size <= limits.inline_limit and inline_total + size <= limits.inline_total
        blob = await store_blob(blobs, path, inline=inline)
        if inline:
            inline_total += blob.size
        manifest.append({"path": rel, **blob.to_wire()})
    return manifest


async def manifest_fields(blobs: BlobStore, manifest: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``finished`` event's fields for ``manifest``: the list itself when small, else a
    reference to a blob holding it (deterministic CBOR of the same list)."""
    encoded = wire.encode(manifest)
    if len(encoded) <= MANIFEST_INLINE_LIMIT:
        return {"outputs": manifest}
    blob = await store_blob(blobs, encoded, inline=False)
    return {"outputs": [], "manifest": blob.to_wire()}


async def load_outputs(blobs: BlobStore, result: Result) -> tuple[OutputFile, ...]:
    """A result's outputs, reading its manifest blob when it has one (sha256 verified)."""
    if result.manifest is None:
        return result.outputs
    data = await blobs.get_bytes(result.manifest.sha256, max_size=MANIFEST_MAX_BYTES)
    try:
        return parse_outputs(wire.decode(data, max_size=MANIFEST_MAX_BYTES))
    except (ValueError, TypeError) as exc:
        raise InvalidInput(
            f"the outputs manifest {result.manifest.sha256} is not valid: {exc}"
        ) from None
