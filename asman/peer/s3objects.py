"""``s3://bucket/key`` inputs and outputs of a job, through the worker's own S3 settings.

A worker whose blob store is S3 (``--blobs s3+http://…`` with its keys) reads a job's ``s3``
data references and uploads the outputs a job names a ``url`` for with those same
credentials, in whichever bucket they reach. A worker without S3 settings says so in one line.
Nothing from the bucket is trusted: object names become file names only when they are valid
relative paths under the prefix, sizes are counted (not taken from listings), and the number
of objects under a prefix is bounded.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from asman.errors import BlobError, InvalidInput, InvalidPath
from asman.log.blobs import BlobStore
from asman.log.definition import validate_relative_path

if TYPE_CHECKING:
    from asman.peer.s3 import S3Blobs

__all__ = ["MAX_PREFIX_OBJECTS", "fetch_s3", "parse_s3_url", "upload_to_s3"]

#: a folder input (an ``s3://bucket/prefix/``) holds at most this many objects
MAX_PREFIX_OBJECTS = 10_000


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key) of ``s3://bucket/key``."""
    parts = urllib.parse.urlsplit(url)
    key = urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme != "s3" or not parts.netloc or not key:
        raise InvalidInput(f"{url!r} is not an s3://bucket/key URL")
    return parts.netloc, key


def _s3(blobs: BlobStore, url: str) -> S3Blobs:
    from asman.peer.s3 import S3Blobs

    if not isinstance(blobs, S3Blobs):
        raise BlobError(
            f"{url}: this worker has no S3 settings: start it with --blobs s3+http(s)://HOST/"
            "BUCKET and its S3 keys to read and write s3:// files"
        )
    return blobs


async def fetch_s3(blobs: BlobStore, url: str, dest: Path, *, max_size: int) -> None:
    """Download ``url`` to ``dest``: one object, or, for a URL ending in ``/``, every object
    under that prefix into the folder ``dest`` (at most ``max_size`` bytes in all)."""
    store = _s3(blobs, url)
    bucket, key = parse_s3_url(url)
    if not key.endswith("/"):
        await asyncio.to_thread(dest.parent.mkdir, parents=True, exist_ok=True)
        await store.get_object_to_file(bucket, key, dest, max_size=max_size)
        return
    objects = await store.list_objects(bucket, key, limit=MAX_PREFIX_OBJECTS)
    budget = max_size
    for name, _listed_size in objects:
        rel = name[len(key) :]
        try:
            validate_relative_path(rel, f"objects under {url}")
        except InvalidPath as exc:
            raise BlobError(f"{url}: object {name!r} cannot be a file here: {exc}") from None
        target = dest / rel
        await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
        budget -= await store.get_object_to_file(bucket, name, target, max_size=budget)
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)


async def upload_to_s3(blobs: BlobStore, path: Path, url: str) -> None:
    """Upload the file ``path`` to ``url`` (``s3://bucket/key``)."""
    store = _s3(blobs, url)
    bucket, key = parse_s3_url(url)
    await store.put_object_file(bucket, key, path)
