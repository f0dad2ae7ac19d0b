"""Image builds that stop when the job does.

docker-py's ``build`` reads the engine's answer in a blocking thread: a job cancelled, or out
of time, stopped waiting but its build went on in the engine (a build ran 80 s under
``maxDuration: "5s"``, and a re-run built the same image a second time beside it). Here the
build request goes to the engine's API over aiohttp: when the awaiting task is cancelled,
the connection closes and the engine cancels the build (the legacy builder stops the step
that runs and removes its container).

Only what docker-py gives is reused: the build context tar (``docker.utils.tar``, with the
``.dockerignore`` rules) and the API version the client negotiated.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import docker.utils

__all__ = ["BuildEndpoint", "BuildLines", "build_events"]

#: the engine's answer is JSON objects, one per line; a line longer than this is refused
MAX_LINE = 1024 * 1024
#: a build output line longer than this is cut into pieces of this size
MAX_OUTPUT_LINE = 64 * 1024


class BuildLines:
    """The lines of a build's output, from the ``stream`` texts of its events.

    The engine cuts its output where it wrote it, not at line ends: a step's title comes
    without its newline, which follows as an event of its own (``"Step 1/2 : FROM x"``,
    ``"\\n"``), and a RUN step's output comes as the step wrote it (``"hi\\n\\na"``,
    ``"b\\n"``). Split event by event, a lone ``"\\n"`` is an empty line (a blank line
    between steps) and ``"a"`` ``"b"`` two lines. Here text is kept until its line ends, as
    ``docker build`` prints it: every line comes out whole, once, and an empty line only
    where the build printed one (a RUN step's ``echo``)."""

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, text: str) -> list[str]:
        """The lines ``text`` completes (without their line ends)."""
        *lines, self._partial = (self._partial + text).split("\n")
        while len(self._partial) > MAX_OUTPUT_LINE:
            lines.append(self._partial[:MAX_OUTPUT_LINE])
            self._partial = self._partial[MAX_OUTPUT_LINE:]
        return [line.removesuffix("\r") for line in lines]

    def close(self) -> list[str]:
        """The last line, if the output did not end with a line end."""
        rest, self._partial = self._partial.removesuffix("\r"), ""
        return [rest] if rest else []


class BuildEndpoint:
    """Where the engine listens: a unix socket or plain TCP (TLS engines fall back to
    docker-py's build, which cannot be cancelled)."""

    def __init__(self, socket_path: str | None, base: str, api_version: str) -> None:
        self.socket_path = socket_path
        self.base = base
        self.api_version = api_version

    @classmethod
    def of(cls, base_url: str | None, api_version: str) -> BuildEndpoint | None:
        """The endpoint of ``base_url`` (as docker-py takes it; None: DOCKER_HOST or the
        default socket), or None when it is not one we can reach ourselves."""
        url = base_url or docker.utils.kwargs_from_env().get("base_url")
        if not url:
            url = "unix:///var/run/docker.sock"
        if url.startswith("unix://"):
            return cls(url[len("unix://") :], "http://docker", api_version)
        if url.startswith("http+unix://"):
            return None
        parts = urlsplit(url.replace("tcp://", "http://", 1))
        if parts.scheme == "http" and parts.hostname:
            return cls(None, f"http://{parts.hostname}:{parts.port or 2375}", api_version)
        return None

    def session(self) -> aiohttp.ClientSession:
        connector: aiohttp.BaseConnector
        if self.socket_path is not None:
            connector = aiohttp.UnixConnector(path=self.socket_path)
        else:
            connector = aiohttp.TCPConnector()
        # no total timeout: a build is bounded by its caller (the job's maxDuration)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        return aiohttp.ClientSession(connector=connector, timeout=timeout)


def context_tar(path: Path, dockerfile: str) -> Path:
    """The build context of ``path`` as a tar file (the ``.dockerignore`` rules applied), in
    a temporary file the caller removes."""
    exclude = None
    ignore = path / ".dockerignore"
    if ignore.is_file():
        lines = ignore.read_text().splitlines()
        exclude = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    fd, name = tempfile.mkstemp(prefix="asman-context-", suffix=".tar")
    with os.fdopen(fd, "wb") as out:
        docker.utils.tar(str(path), exclude=exclude, dockerfile=(dockerfile, None), fileobj=out)
    return Path(name)


async def build_events(
    endpoint: BuildEndpoint, path: Path, params: Mapping[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """POST ``/build`` with the context of ``path``; yields the engine's JSON events.

    Leaving the iteration early (an exception, a cancel) closes the connection, which
    cancels the build in the engine."""
    dockerfile = str(params.get("dockerfile") or "Dockerfile")
    tar = await asyncio.to_thread(context_tar, path, dockerfile)
    try:
        query = {k: _query_value(v) for k, v in params.items() if v is not None}
        url = f"{endpoint.base}/v{endpoint.api_version}/build"
        async with endpoint.session() as session:
            with tar.open("rb") as body:
                async with session.post(
                    url,
                    params=query,
                    data=body,
                    headers={"Content-Type": "application/x-tar"},
                ) as resp:
                    if resp.status != 200:
                        text = (await resp.text())[:2000]
                        yield {"error": f"the engine refused the build: HTTP {resp.status} {text}"}
                        return
                    buffer = b""
                    async for chunk in resp.content.iter_any():
                        buffer += chunk
                        if len(buffer) > MAX_LINE and b"\n" not in buffer:
                            yield {"error": "the engine sent a build event over 1 MiB"}
                            return
                        *lines, buffer = buffer.split(b"\n")
                        for line in lines:
                            event = _event(line)
                            if event is not None:
                                yield event
                    event = _event(buffer)
                    if event is not None:
                        yield event
    finally:
        await asyncio.to_thread(tar.unlink, missing_ok=True)


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _event(line: bytes) -> dict[str, Any] | None:
    line = line.strip()
    if not line:
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return {"stream": line.decode("utf-8", "replace") + "\n"}
    return event if isinstance(event, dict) else None
