"""Bytes over HTTP: job inputs and outputs by path, and blobs by SHA-256.

With S3 the bytes never pass through the gateway: a GET is answered with a redirect to a
presigned URL, a PUT with a redirect to a presigned upload URL. With the JetStream object
store the gateway streams them itself (small blobs from memory, large ones through a
temporary file that is unlinked as soon as it is open).

Files a job produced are untrusted content served from the gateway's origin, so every file
response carries ``Content-Security-Policy: sandbox`` and ``nosniff``: an HTML output cannot
run script against the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import mimetypes
import re
import uuid
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

from aiohttp import web

from asman.errors import BlobNotFound, InvalidInput
from asman.gateway.limits import TooLarge
from asman.gateway.state import BLOBS, CONFIG, TMP_DIR
from asman.log.blobs import READ_SIZE, BlobInfo, check_sha256
from asman.log.definition import DataRef

__all__ = [
    "FILE_HEADERS",
    "blob_exists_view",
    "content_type",
    "parse_sha256",
    "receive_blob",
    "send_blob",
    "send_bytes",
    "send_ref",
]

SMALL_BLOB = 4 * 1024 * 1024
FILE_HEADERS = {
    "Content-Security-Policy": "sandbox; default-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private, max-age=60",
}
_KEY = re.compile(r"(?:sha256/)?([0-9a-f]{64})")


def parse_sha256(value: str) -> str:
    """A blob name from a URL: 64 lower-case hex digits (``sha256/`` prefix allowed)."""
    m = _KEY.fullmatch(value)
    if m is None:
        raise InvalidInput(
            f"{value[:80]!r} is not a blob name: use the SHA-256 of the bytes, 64 lower-case "
            "hex digits"
        )
    return check_sha256(m.group(1))


def content_type(name: str) -> str:
    guessed, _ = mimetypes.guess_type(name, strict=False)
    if guessed is None:
        return "application/octet-stream"
    if guessed.startswith("text/") or guessed in ("application/json", "application/javascript"):
        return f"{guessed}; charset=utf-8"
    return guessed


def _headers(request: web.Request, name: str, size: int | None) -> dict[str, str]:
    headers = dict(FILE_HEADERS)
    headers["Content-Type"] = content_type(name)
    if size is not None:
        headers["Content-Length"] = str(size)
    base = name.rsplit("/", 1)[-1] or "file"
    if request.query.get("download") not in (None, "", "0", "false"):
        headers["Content-Disposition"] = f"attachment; filename*=UTF-8''{quote(base)}"
    else:
        headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(base)}"
    return headers


async def send_bytes(request: web.Request, data: bytes, name: str) -> web.StreamResponse:
    headers = _headers(request, name, len(data))
    del headers["Content-Length"]
    return web.Response(body=data, headers=headers)


async def send_blob(
    request: web.Request,
    sha256: str,
    name: str,
    *,
    size: int | None = None,
    redirect: bool = True,
) -> web.StreamResponse:
    """The blob's bytes, or a 302 to a presigned URL when the store can make one."""
    blobs = request.app[BLOBS]
    config = request.app[CONFIG]
    if redirect:
        base = name.rsplit("/", 1)[-1] or None
        url = await blobs.presigned_get(sha256, expires_s=config.presign_expires_s, filename=base)
        if url is not None:
            raise web.HTTPFound(url, headers={"Cache-Control": "no-store"})
    if size is None:
        info = await blobs.exists(sha256)
        if info is None:
            raise BlobNotFound(f"blob {sha256} is not stored", key=f"sha256/{sha256}")
        size = info.size
    if request.method == "HEAD":
        return web.Response(headers=_headers(request, name, size))
    if size <= SMALL_BLOB:
        data = await blobs.get_bytes(sha256, max_size=size)
        return await send_bytes(request, data, name)
    tmp = request.app[TMP_DIR] / f"get-{uuid.uuid4().hex}"
    try:
        await blobs.get_to_file(sha256, tmp, max_size=size)
        f: BinaryIO = await asyncio.to_thread(open, tmp, "rb")
    finally:
        # open (or failed): the name is not needed any more, the open file keeps the bytes
        await asyncio.to_thread(_unlink, tmp)
    try:
        response = web.StreamResponse(headers=_headers(request, name, size))
        await response.prepare(request)
        while data := await asyncio.to_thread(f.read, READ_SIZE):
            await response.write(data)
        await response.write_eof()
        return response
    finally:
        await asyncio.to_thread(f.close)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


async def send_ref(request: web.Request, ref: DataRef, name: str) -> web.StreamResponse:
    """An input file: inline content as bytes, a blob as ``send_blob``, a URL by redirect."""
    if ref.is_inline:
        return await send_bytes(request, ref.inline_bytes(), name)
    if ref.type == "url":
        raise web.HTTPFound(str(ref.value))
    value = str(ref.value)
    m = _KEY.fullmatch(value)
    if m is None:
        raise InvalidInput(
            f"input {name!r} is a legacy {ref.type!r} reference ({value[:60]!r}) that names no "
            "blob: it cannot be served"
        )
    return await send_blob(request, m.group(1), name, size=ref.size)


async def receive_blob(request: web.Request, sha256: str) -> BlobInfo:
    """Store the request body as blob ``sha256`` (object store path): streamed to a temporary
    file, bounded by ``max_blob_bytes``, and refused unless its bytes hash to ``sha256``."""
    limit = request.app[CONFIG].limits.max_blob_bytes
    if request.content_length is not None and request.content_length > limit:
        raise TooLarge(f"the blob is {request.content_length} bytes, over the limit of {limit}")
    tmp = request.app[TMP_DIR] / f"put-{uuid.uuid4().hex}"
    digest = hashlib.sha256()
    size = 0
    f: BinaryIO = await asyncio.to_thread(open, tmp, "wb")
    try:
        try:
            async for chunk in request.content.iter_chunked(READ_SIZE):
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the blob is over the limit of {limit} bytes")
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
        finally:
            await asyncio.to_thread(f.close)
        got = digest.hexdigest()
        if got != sha256:
            raise InvalidInput(
                f"the body's SHA-256 is {got}, not {sha256}: PUT the bytes to /f/<their sha256>"
            )
        return await request.app[BLOBS].put_file(tmp, sha256=sha256)
    finally:
        await asyncio.to_thread(_unlink, tmp)


def blob_exists_view(info: BlobInfo | None) -> dict[str, Any]:
    if info is None:
        return {"exists": False}
    return {"exists": True, "sha256": info.sha256, "size": info.size}
