"""Materialising a job's inputs on the worker: inline refs written, blobs fetched once into a
per-worker cache (verified by sha256), URLs fetched with retries, a size limit and a deadline.

Nothing from the outside is trusted: every name was validated with the definition, every
byte count is bounded, every download is checked against its digest when one is known, and
every URL (inputs, config files, build contexts, and each redirect) goes through the worker's
:class:`~asman.peer.netguard.UrlPolicy`: no fetch from this machine or its private networks
unless the operator allowed it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from pathlib import Path

import aiohttp

from asman.errors import BlobError, BlobTooLarge, InvalidPath
from asman.log.blobs import BlobStore
from asman.log.definition import DataRef, JobSpec, validate_relative_path
from asman.peer.netguard import UrlPolicy, guarded_get, guarded_session
from asman.peer.s3objects import fetch_s3

__all__ = ["InputFetcher"]

logger = logging.getLogger(__name__)

_BLOB_URL = re.compile(r"/f/([0-9a-f]{64})(?:[/?#]|$)")
_KEY = re.compile(r"(?:sha256/)?([0-9a-f]{64})")
URL_TRIES = 5


class InputFetcher:
    """Fetches a job's inputs. ``policy`` says which non-public hosts URLs may point at
    (none by default); ``url_timeout_s`` bounds each URL download, retries included."""

    def __init__(
        self,
        blobs: BlobStore,
        *,
        cache_dir: Path,
        url_limit: int,
        url_timeout_s: float,
        policy: UrlPolicy | None = None,
    ) -> None:
        self.blobs = blobs
        self.cache_dir = cache_dir
        self.url_limit = url_limit
        self.url_timeout_s = url_timeout_s
        self.policy = policy if policy is not None else UrlPolicy()
        self._locks: dict[str, asyncio.Lock] = {}

    async def materialize(
        self, spec: JobSpec, inputs_dir: Path, config_dir: Path, *, deadline: float | None = None
    ) -> list[tuple[Path, str]]:
        """Write ``inputs`` and relative ``configFiles`` under ``inputs_dir``; absolute
        ``configFiles`` go to ``config_dir`` and are returned as (host path, container path)
        read-only mounts. URL downloads end by ``deadline`` (``time.monotonic()`` seconds),
        when one is given: the job's time runs while its inputs download."""
        mounts: list[tuple[Path, str]] = []
        for name, ref in spec.inputs.items():
            await self._write(ref, _inside(inputs_dir, name, "inputs"), deadline)
        for name, ref in spec.config_files.items():
            if name.startswith("/"):
                host = config_dir / f"{len(mounts):04d}"
                await self._write(ref, host, deadline)
                mounts.append((host, name))
            else:
                await self._write(ref, _inside(inputs_dir, name, "configFiles"), deadline)
        await asyncio.to_thread(_open_up, inputs_dir)
        return mounts

    async def _write(self, ref: DataRef, dest: Path, deadline: float | None) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if ref.type == "s3":  # a file or a folder, with the worker's own S3 settings
            await fetch_s3(self.blobs, str(ref.value), dest, max_size=self.url_limit)
            return
        if ref.is_inline:
            data = ref.inline_bytes()
            await asyncio.to_thread(dest.write_bytes, data)
            return
        cached = await self.fetch(ref, deadline=deadline)
        await asyncio.to_thread(_link_or_copy, cached, dest)

    async def fetch(self, ref: DataRef, *, deadline: float | None = None) -> Path:
        """The cached file holding ``ref``'s bytes (downloading it once per worker)."""
        sha = ref.hash
        if ref.type == "blob":
            sha = ref.value
        elif ref.type == "key":
            m = _KEY.fullmatch(str(ref.value))
            if not m:
                raise BlobError(f"legacy key input {ref.value!r} is not a sha256 blob key")
            sha = m.group(1)
        elif ref.type == "url" and sha is None:
            m = _BLOB_URL.search(str(ref.value))
            sha = m.group(1) if m else None
        if sha is not None:
            path = self.cache_dir / sha
            lock = self._locks.setdefault(sha, asyncio.Lock())
            async with lock:
                if path.exists():
                    return path
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                if ref.type in ("blob", "key"):
                    await self.blobs.get_to_file(sha, path, max_size=self.url_limit)
                else:
                    part, _ = await self._download(str(ref.value), sha, deadline)
                    await asyncio.to_thread(os.replace, part, path)
                return path
        # a URL with no known digest: fetch it, then file it under its digest
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        part, digest = await self._download(str(ref.value), None, deadline)
        path = self.cache_dir / digest
        await asyncio.to_thread(os.replace, part, path)
        return path

    async def fetch_context(self, url: str, dest: Path, *, deadline: float | None = None) -> Path:
        """Download a build context archive to ``dest``: an archive URL, ``blob:<sha256>``,
        or a GitHub repository URL (``…/owner/repo``, ``…/tree/<ref>``, ``…/commit/<sha>``,
        ``#<ref>``), fetched as its zip archive."""
        if url.startswith("blob:"):
            cached = await self.fetch(DataRef("blob", url[5:]), deadline=deadline)
        else:
            last: BlobError | None = None
            for candidate in context_archive_urls(url):
                try:
                    cached = await self.fetch(DataRef("url", candidate), deadline=deadline)
                    break
                except BlobError as exc:
                    last = exc
            else:
                assert last is not None
                raise last
        dest.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(shutil.copyfile, cached, dest)
        return dest

    async def _download(
        self, url: str, sha256: str | None, deadline: float | None
    ) -> tuple[Path, str]:
        """GET ``url`` into a new file of the cache folder, with retries; returns the file
        (the caller moves it in place) and its sha256. Bounded in bytes, and in time by the
        worker's URL timeout or ``deadline`` if sooner; a URL the policy refuses is not
        tried again. Nothing is left behind on failure or cancellation."""
        budget, bound = (
            self.url_timeout_s,
            f"the worker's download limit of {self.url_timeout_s:g}s",
        )
        if deadline is not None and deadline - time.monotonic() < budget:
            budget, bound = max(0.0, deadline - time.monotonic()), "the job's time limit"
        part = self.cache_dir / f".part-{secrets.token_hex(8)}"
        last: Exception | None = None
        try:
            async with asyncio.timeout(budget):
                for attempt in range(URL_TRIES):
                    try:
                        return part, await self._download_once(url, part, sha256)
                    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                        last = exc
                        if isinstance(exc, aiohttp.ClientResponseError) and (
                            400 <= exc.status < 500 and exc.status not in (408, 429)
                        ):
                            break  # the server said no: asking again will not change that
                        if attempt + 1 < URL_TRIES:
                            await asyncio.sleep(min(0.5 * 2**attempt, 5.0))
        except TimeoutError:
            why = f" (last error: {last})" if last else ""
            raise BlobError(
                f"input {url} was not downloaded in time: it ran into {bound}{why}"
            ) from None
        raise BlobError(f"could not fetch input {url}: {last}")

    async def _download_once(self, url: str, part: Path, sha256: str | None) -> str:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)
        h = hashlib.sha256()
        size = 0
        headers = {"Accept-Encoding": "identity"}
        async with (
            guarded_session(self.policy, timeout) as session,
            guarded_get(session, url, self.policy, headers=headers, target=f"input {url}") as resp,
        ):
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message=f"HTTP {resp.status}"
                )
            if resp.content_length is not None and resp.content_length > self.url_limit:
                raise BlobTooLarge(
                    f"input {url} is {resp.content_length} bytes, over the limit of "
                    f"{self.url_limit}"
                )
            # Opened, and on failure removed, in this thread: a file opened in a thread
            # could appear after a cancellation's clean-up, and a clean-up in a thread could
            # be cut short by a second cancellation. (A close waits for a write in flight.)
            try:
                with open(part, "wb") as f:  # noqa: ASYNC230 - creating one local file is quick
                    async for chunk in resp.content.iter_chunked(1024 * 1024):
                        size += len(chunk)
                        if size > self.url_limit:
                            raise BlobTooLarge(
                                f"input {url} is over the limit of {self.url_limit} bytes"
                            )
                        h.update(chunk)
                        await asyncio.to_thread(f.write, chunk)
                digest = h.hexdigest()
                if sha256 is not None and digest != sha256:
                    raise BlobError(
                        f"input {url} does not match its sha256 {sha256} (got {digest})"
                    )
            except BaseException:
                _discard(part)
                raise
        return digest


_GITHUB = re.compile(
    r"https://(?P<auth>[^@/]+@)?github\.com/(?P<owner>[\w.-]+)/(?P<repo>[\w.-]+?)(?:\.git)?"
    r"(?:/(?:tree|commit)/(?P<ref>[^?#]+))?/?(?:#(?P<frag>[^?]+))?"
)


def context_archive_urls(url: str) -> list[str]:
    """The archive URLs to try for a build context, in order (compute-queues' rules): a
    GitHub repository at a branch, tag or commit becomes its zip archive; anything else is
    taken as an archive URL as it is."""
    m = _GITHUB.fullmatch(url)
    if not m:
        return [url]
    auth = m.group("auth") or ""
    base = f"https://{auth}github.com/{m.group('owner')}/{m.group('repo')}/archive"
    ref = m.group("ref") or m.group("frag")
    if ref is None:
        return [f"{base}/refs/heads/main.zip", f"{base}/refs/heads/master.zip"]
    return [f"{base}/refs/heads/{ref}.zip", f"{base}/{ref}.zip"]


def _inside(root: Path, name: str, field: str) -> Path:
    """``root / name`` after checking ``name`` cannot escape ``root``."""
    validate_relative_path(name, field)
    path = (root / name).resolve()
    if root.resolve() not in path.parents:
        raise InvalidPath(name, f"escapes /{field}")
    return path


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def _open_up(root: Path) -> None:
    """Make the inputs readable by the container's unprivileged user."""
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o644)
        _ = dirnames
