"""The Docker runtime: runs a job's container hardened, streams its output, builds and pulls images.

Every container is created hardened (anchors §6.2): user 65534, ``cap_drop=ALL``,
``no-new-privileges``, a read-only root with a tmpfs ``/tmp``, pids/memory/CPU limits,
``nofile`` and ``core=0`` ulimits, ``init``, no network unless the job opts into ``bridge``,
``/inputs`` bound read-only and ``/outputs`` read-write. It is never privileged and never sees
the Docker socket. Labels ``asman=1``, ``asman.job``, ``asman.queue``, ``asman.worker`` and
``asman.attempt`` let :meth:`DockerRuntime.cleanup_orphans` find leftovers after a crash.

The docker SDK is synchronous. Short calls go through ``asyncio.to_thread`` once, here.
Calls that block for the life of a container, a pull or a build (an attach stream, a build
stream) run on the runtime's own thread pool, so that many running jobs never starve the
loop's default executor; they hand what they read to the loop with
``loop.call_soon_threadsafe`` and never wait for the consumer (see :class:`_Channel`).

Docker and requests exceptions are translated here into :mod:`asman.errors`; nothing from
``docker.*`` escapes this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import posixpath
import re
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, ParamSpec, Self, TypeVar

import aiohttp
import docker
import docker.errors
import docker.types
import docker.utils
import requests

from asman.errors import (
    DockerUnavailable,
    ImageError,
    InvalidDefinition,
    InvalidPath,
    RuntimeFailure,
)
from asman.log.definition import RESERVED_FILES
from asman.peer.archive import unpack_archive
from asman.peer.dockerbuild import BuildEndpoint, BuildLines, build_events
from asman.peer.jobdir import fresh_dir

__all__ = [
    "BUILD_REPOSITORY",
    "INPUTS",
    "LABEL",
    "LABEL_ATTEMPT",
    "LABEL_JOB",
    "LABEL_QUEUE",
    "LABEL_WORKER",
    "OUTPUTS",
    "BuildSpec",
    "ContainerSpec",
    "DockerRuntime",
    "FetchContext",
    "LogCallback",
    "OutputCallback",
    "RunOutcome",
    "build_tag",
]

logger = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")

OutputCallback = Callable[[str, bytes], Awaitable[None]]
"""``on_output(stream, chunk)`` with ``stream`` ``"stdout"`` or ``"stderr"``."""
LogCallback = Callable[[str], Awaitable[None]]
"""``on_log(line)``: one line of pull or build progress."""
FetchContext = Callable[[str, Path], Awaitable[Path]]
"""``fetch_context(url, dest)`` downloads a build context; returns an archive file or a folder."""

INPUTS = "/inputs"
OUTPUTS = "/outputs"
LABEL = "asman"
LABEL_JOB, LABEL_QUEUE = "asman.job", "asman.queue"
LABEL_WORKER, LABEL_ATTEMPT = "asman.worker", "asman.attempt"
#: the data dir of the worker that made a container (its lock tells whether that worker lives)
LABEL_DATA_DIR = "asman.datadir"
BUILD_REPOSITORY = "asman-build"

_DEFAULT_HOST = "unix:///var/run/docker.sock"
_KILL_WAIT_S = 30.0  # after SIGKILL, how long to wait for the engine to report the exit
_LOG_TAIL = 200  # lines of build/pull output kept for ImageError.log
_SOCKETS = ("/var/run/docker.sock", "/run/docker.sock")
_NAME_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass(frozen=True, slots=True, kw_only=True)
class ContainerSpec:
    """Everything needed to run one attempt of one job."""

    job_id: str
    queue: str
    worker_id: str
    attempt: int
    image: str
    inputs_dir: Path
    outputs_dir: Path
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    extra_mounts: tuple[tuple[Path, str], ...] = ()  # (host file, absolute container path), ro
    #: folders shared by the steps of a multi-step job: (host folder, container folder), rw
    rw_mounts: tuple[tuple[Path, str], ...] = ()
    #: a host file fed to the container's stdin (a step's ``stdin``); None: no stdin
    stdin_file: Path | None = None
    cpus: float | None = None
    memory_bytes: int | None = None
    shm_size_bytes: int | None = None
    gpu_devices: tuple[str, ...] = ()
    network: str = "none"  # or "bridge"
    pids_limit: int = 1024
    tmpfs_size: str = "256m"
    user: str = "65534:65534"
    nofile: int = 4096
    data_dir: str = ""  # the worker's, absolute (a label: see cleanup_orphans)


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """How a container ended. ``exit_code`` is None when it never reported one."""

    exit_code: int | None
    oom_killed: bool
    timed_out: bool
    stopped: bool
    started_ms: int
    ended_ms: int
    duration_ms: int
    output_dropped_bytes: int = 0  # output lost because ``on_output`` fell too far behind


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """An image build: an inline Dockerfile, a context archive URL, or both."""

    dockerfile: str | None = None
    context: str | None = None
    build_context: str = "."
    filename: str | None = None
    target: str | None = None
    platform: str | None = None
    build_args: Mapping[str, str] = field(default_factory=dict)


def build_tag(build: BuildSpec) -> str:
    """``asman-build/<32 hex of sha256 of the canonical spec>:latest``."""
    canonical = {
        "dockerfile": build.dockerfile,
        "context": build.context,
        "build_context": build.build_context,
        "filename": build.filename,
        "target": build.target,
        "platform": build.platform,
        "build_args": dict(sorted(build.build_args.items())),
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return f"{BUILD_REPOSITORY}/{hashlib.sha256(text.encode()).hexdigest()[:32]}:latest"


class DockerRuntime:
    """Runs job containers on one Docker engine. Use as ``async with DockerRuntime() as rt``.

    ``base_url`` defaults to the SDK's environment (``DOCKER_HOST``, else the local socket).
    ``output_buffer_bytes`` bounds output read from a container but not yet taken by
    ``on_output``; past it, output is dropped and counted rather than stalling the container.
    ``stream_threads`` bounds concurrent long calls (attach streams, pulls, builds).
    """

    #: The container reads ``/inputs`` and writes ``/outputs``: host folders bound in.
    mounts_folders = True

    def __init__(
        self,
        base_url: str | None = None,
        *,
        timeout_s: float = 60.0,
        output_buffer_bytes: int = 16 * 1024 * 1024,
        stream_threads: int = 64,
    ) -> None:
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._output_buffer_bytes = output_buffer_bytes
        self._stream_threads = stream_threads
        self._client: Any = None
        self._threads: ThreadPoolExecutor | None = None
        self._state = "new"

    @property
    def host(self) -> str:
        """The engine address, for messages."""
        if self._base_url:
            return self._base_url
        return str(docker.utils.kwargs_from_env().get("base_url") or _DEFAULT_HOST)

    async def __aenter__(self) -> Self:
        if self._state != "new":
            raise RuntimeError("a DockerRuntime can be opened only once: make a new one")
        self._state = "opening"
        try:
            self._client = await asyncio.to_thread(self._connect)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            self._state = "closed"
            raise self._unavailable(exc) from exc
        self._threads = ThreadPoolExecutor(self._stream_threads, thread_name_prefix="asman-docker")
        self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._state = "closed"
        client, self._client = self._client, None
        threads, self._threads = self._threads, None
        if client is not None:
            await asyncio.to_thread(client.close)
        if threads is not None:
            threads.shutdown(wait=False, cancel_futures=True)

    def _connect(self) -> Any:
        pool = self._stream_threads + 16
        if self._base_url:
            return docker.DockerClient(
                base_url=self._base_url, timeout=self._timeout_s, max_pool_size=pool
            )
        return docker.from_env(timeout=self._timeout_s, max_pool_size=pool)

    def _api(self) -> Any:
        if self._state != "open":
            raise RuntimeError(
                "this DockerRuntime is not open: use it inside `async with DockerRuntime() as rt`"
            )
        return self._client.api

    # ---- errors -------------------------------------------------------------------------

    def _unavailable(self, exc: BaseException) -> DockerUnavailable:
        return DockerUnavailable(
            f"no Docker engine at {self.host}: start dockerd (scripts/start-dockerd.sh) "
            f"or set DOCKER_HOST ({_explain(exc)})"
        )

    def _translate(self, what: str, exc: BaseException) -> RuntimeFailure:
        if isinstance(exc, requests.exceptions.ConnectionError):
            return self._unavailable(exc)
        if isinstance(exc, requests.exceptions.Timeout):
            return RuntimeFailure(f"the Docker engine did not answer in time to {what}")
        if isinstance(exc, docker.errors.ImageNotFound):
            return ImageError(f"could not {what}: {_explain(exc)}: pull or build the image first")
        if isinstance(exc, docker.errors.APIError):
            return RuntimeFailure(f"could not {what}: {_explain(exc)}")
        return RuntimeFailure(f"could not {what}: {_explain(exc)}")

    async def _call(
        self, what: str, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs
    ) -> _T:
        """Run one short SDK call in a thread, translating its errors."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise self._translate(what, exc) from exc

    async def _iterate(
        self, what: str, open_stream: Callable[[], Iterable[_T]], limit: int = 10_000
    ) -> AsyncGenerator[_T, None]:
        """Iterate a blocking SDK stream on the stream pool; errors are translated."""
        assert self._threads is not None
        channel: _Channel[_T] = _Channel(asyncio.get_running_loop(), limit)
        reader = asyncio.get_running_loop().run_in_executor(
            self._threads, _read_all, open_stream, channel
        )
        async for item in channel:
            yield item
        error = await reader
        if error is not None:
            raise self._translate(what, error) from error

    # ---- engine -------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise DockerUnavailable unless the engine answers."""
        api = self._api()
        try:
            await asyncio.to_thread(api.ping)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise self._unavailable(exc) from exc

    async def cleanup_orphans(
        self, worker_id: str | None = None, *, abandoned: Callable[[str], bool] | None = None
    ) -> int:
        """Remove containers labelled ``asman=1``: only ``worker_id``'s when given; with
        ``abandoned``, only those whose worker's data dir it says was abandoned (called
        with each data dir found on a container)."""
        api = self._api()
        labels = [f"{LABEL}=1"]
        if worker_id is not None:
            labels.append(f"{LABEL_WORKER}={worker_id}")
        if abandoned is not None:
            labels.append(LABEL_DATA_DIR)
        found = await self._call(
            "list leftover containers", api.containers, all=True, filters={"label": labels}
        )
        if abandoned is not None:
            dirs = {c["Labels"].get(LABEL_DATA_DIR, "") for c in found}
            dead = {d for d in dirs if d and await asyncio.to_thread(abandoned, d)}
            found = [c for c in found if c["Labels"].get(LABEL_DATA_DIR) in dead]
        removed = 0
        for container in found:
            if await self._call("remove a leftover container", _remove, api, container["Id"]):
                logger.info("removed leftover container %s", container["Id"][:12])
                removed += 1
        return removed

    # ---- images -------------------------------------------------------------------------

    async def ensure_image(self, image: str, on_log: LogCallback | None = None) -> None:
        """Use ``image`` if present locally, else pull it, streaming progress to ``on_log``."""
        api = self._api()
        if await self._call(f"inspect image {image!r}", _image_present, api, image):
            return
        repository, tag = docker.utils.parse_repository_tag(image)
        tail: deque[str] = deque(maxlen=_LOG_TAIL)
        await _emit(on_log, tail, f"pulling {image}")
        failure = f"image {image!r} not found locally and could not be pulled"
        error: str | None = None
        events = self._iterate(
            f"pull {image!r}",
            lambda: api.pull(repository, tag=tag or "latest", stream=True, decode=True),
        )
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    if event.get("error") or event.get("errorDetail"):
                        error = event.get("error") or event["errorDetail"].get("message", "")
                        await _emit(on_log, tail, str(error))
                    elif line := _pull_line(event):
                        await _emit(on_log, tail, line)
        except DockerUnavailable:
            raise
        except RuntimeFailure as exc:
            raise ImageError(
                f"{failure}: {_explain(exc.__cause__ or exc)}", log="\n".join(tail)
            ) from exc
        if error is not None:
            raise ImageError(f"{failure}: {str(error).strip()}", log="\n".join(tail))
        if not await self._call(f"inspect image {image!r}", _image_present, api, image):
            raise ImageError(f"{failure}: the engine reported no error", log="\n".join(tail))

    async def build(
        self,
        build: BuildSpec,
        *,
        work_dir: Path,
        fetch_context: FetchContext | None = None,
        on_log: LogCallback | None = None,
        network: str = "none",
        memory_bytes: int | None = None,
        cpus: float | None = None,
    ) -> str:
        """Build ``build`` with the legacy builder and return its tag (cached by spec hash).

        ``work_dir`` is an empty folder this call may fill. ``network`` ("none" or "bridge"),
        ``memory_bytes`` and ``cpus`` apply to the build's RUN steps. Cancelling the call
        cancels the build in the engine (``asman.peer.dockerbuild``).
        """
        api = self._api()
        tag = build_tag(build)
        tail: deque[str] = deque(maxlen=_LOG_TAIL)
        if await self._call(f"inspect image {tag}", _image_present, api, tag):
            await _emit(on_log, tail, f"using cached build {tag}")
            return tag
        network_mode = _network_mode(network)
        path, dockerfile = await self._build_context(build, work_dir, fetch_context)
        limits: dict[str, int] = {}
        if memory_bytes:
            limits.update(memory=memory_bytes, memswap=memory_bytes)
        if cpus:
            limits.update(cpuperiod=100_000, cpuquota=max(1000, int(cpus * 100_000)))
        await _emit(on_log, tail, f"building {tag}")
        endpoint = BuildEndpoint.of(self._base_url, str(api.api_version))
        error: str | None = None
        if endpoint is not None:
            params: dict[str, Any] = {
                "t": tag,
                "dockerfile": dockerfile,
                "buildargs": dict(build.build_args) or None,
                "target": build.target,
                "platform": build.platform,
                "networkmode": network_mode,
                "rm": True,
                "forcerm": True,
                "pull": False,
                **limits,
            }
            events: AsyncIterator[Any] = build_events(endpoint, path, params)
        else:  # an engine we can only reach through docker-py: not cancellable
            events = self._iterate(
                "build the image",
                lambda: api.build(
                    path=str(path),
                    dockerfile=dockerfile,
                    tag=tag,
                    buildargs=dict(build.build_args) or None,
                    target=build.target,
                    platform=build.platform,
                    network_mode=network_mode,
                    container_limits=limits,
                    rm=True,
                    forcerm=True,
                    decode=True,
                    pull=False,
                    use_config_proxy=False,
                ),
            )
        output = BuildLines()
        try:
            async for event in events:
                if not isinstance(event, dict):
                    continue
                if event.get("error") or event.get("errorDetail"):
                    detail = event.get("errorDetail")
                    error = event.get("error") or (
                        detail.get("message", "") if isinstance(detail, dict) else ""
                    )
                    for line in output.close():
                        await _emit(on_log, tail, line)
                    await _emit(on_log, tail, str(error).rstrip())
                elif isinstance(event.get("stream"), str):
                    for line in output.feed(event["stream"]):
                        await _emit(on_log, tail, line)
            for line in output.close():
                await _emit(on_log, tail, line)
        except DockerUnavailable:
            raise
        except RuntimeFailure as exc:
            message = _explain(exc.__cause__ or exc)
            raise ImageError(f"image build failed: {message}", log="\n".join(tail)) from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise ImageError(
                f"image build failed: lost the engine: {exc}", log="\n".join(tail)
            ) from exc
        finally:
            await _aclose(events)
        if error is not None:
            raise ImageError(f"image build failed: {str(error).strip()}", log="\n".join(tail))
        if not await self._call(f"inspect image {tag}", _image_present, api, tag):
            raise ImageError(
                "image build failed: the engine reported no error but made no image",
                log="\n".join(tail),
            )
        return tag

    async def _build_context(
        self, build: BuildSpec, work_dir: Path, fetch_context: FetchContext | None
    ) -> tuple[Path, str]:
        """Lay out the context folder; return it and the Dockerfile path relative to it."""
        if build.dockerfile is None and not build.context:
            raise InvalidDefinition("build", "give a dockerfile, a context URL, or both")
        context = work_dir / "context"
        await asyncio.to_thread(fresh_dir, context)
        root = context
        if build.context:
            if fetch_context is None:
                raise ImageError("this worker cannot fetch build contexts (no fetcher given)")
            fetched = await fetch_context(build.context, work_dir / "download")
            if fetched.is_dir():
                root = fetched
            else:
                root = await asyncio.to_thread(unpack_archive, fetched, context)
        path = _inside(root, build.build_context, "escapes the build context")
        if not path.is_dir():
            raise InvalidPath(build.build_context, "is not a folder in the build context")
        dockerfile = _inside(path, build.filename or "Dockerfile", "escapes the build context")
        if build.dockerfile is not None:
            await asyncio.to_thread(dockerfile.parent.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(dockerfile.write_text, build.dockerfile)
        elif not dockerfile.is_file():
            raise InvalidPath(build.filename or "Dockerfile", "is not in the build context")
        return path, dockerfile.relative_to(path.resolve()).as_posix()

    # ---- containers ---------------------------------------------------------------------

    async def run(
        self,
        spec: ContainerSpec,
        *,
        on_output: OutputCallback | None = None,
        stop: asyncio.Event,
        timeout_s: float | None = None,
        grace_s: float = 10.0,
    ) -> RunOutcome:
        """Run one container to its end; always remove it, even when this task is cancelled.

        The container ends by itself, or after ``timeout_s`` (``timed_out``), or when ``stop``
        is set (``stopped``): SIGTERM, ``grace_s`` to exit, then SIGKILL. If ``on_output``
        raises, the container is killed and its exception re-raised.
        """
        api = self._api()
        create, host = _container_args(spec)
        if stop.is_set():
            now = _now_ms()
            return RunOutcome(None, False, False, True, now, now, 0)
        loop = asyncio.get_running_loop()
        creating = asyncio.ensure_future(
            self._call(f"create a container from {spec.image!r}", _create, api, create, host)
        )
        try:
            cid = await asyncio.shield(creating)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self._remove_quietly(await creating)
            raise
        try:
            return await self._run_created(
                api, loop, cid, spec, on_output, stop, timeout_s, grace_s
            )
        finally:
            await self._remove_quietly(cid)

    async def _run_created(
        self,
        api: Any,
        loop: asyncio.AbstractEventLoop,
        cid: str,
        spec: ContainerSpec,
        on_output: OutputCallback | None,
        stop: asyncio.Event,
        timeout_s: float | None,
        grace_s: float,
    ) -> RunOutcome:
        assert self._threads is not None
        channel: _Channel[tuple[str, bytes]] = _Channel(
            loop, self._output_buffer_bytes, lambda item: len(item[1])
        )
        # Attach before start (as `docker run` does), so no early output is missed.
        stream = await self._call(
            "attach to the container", api.attach, cid, stream=True, demux=True
        )
        exited = loop.run_in_executor(self._threads, _follow, api, cid, stream, channel)
        stdin: Any = None
        feeding: asyncio.Future[None] | None = None
        if spec.stdin_file is not None:
            stdin = await self._call(
                "attach to the container's stdin",
                api.attach_socket,
                cid,
                params={"stdin": 1, "stream": 1},
            )
        await self._call(f"start the container of job {spec.job_id}", api.start, cid)
        started = _now_ms()
        if stdin is not None:
            assert spec.stdin_file is not None
            feeding = loop.run_in_executor(self._threads, _feed_stdin, stdin, spec.stdin_file, cid)
        failure: list[BaseException] = []
        failed = asyncio.Event()
        why: str | None = None

        async def deliver() -> None:
            async for item in channel:
                if on_output is None or failure:
                    continue
                try:
                    await on_output(*item)
                except Exception as exc:
                    failure.append(exc)
                    failed.set()
            if channel.dropped and on_output is not None and not failure:
                note = (
                    f"[asman: {channel.dropped} bytes of output dropped: the reader fell behind]\n"
                )
                with contextlib.suppress(Exception):
                    await on_output("stderr", note.encode())

        error: Exception | None = None  # raised after the TaskGroup, so it is not grouped
        async with asyncio.TaskGroup() as tg:
            tg.create_task(deliver())
            stopping = tg.create_task(stop.wait())
            aborting = tg.create_task(failed.wait())
            try:
                waits: set[asyncio.Future[Any]] = {exited, stopping, aborting}
                done, _ = await asyncio.wait(
                    waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
                if exited not in done:
                    why = "abort" if aborting in done else "stop" if stopping in done else "timeout"
                    logger.info("stopping container %s of job %s: %s", cid[:12], spec.job_id, why)
                    await self._terminate(cid, exited, 0.0 if why == "abort" else grace_s)
            except Exception as exc:
                error = exc
            finally:
                stopping.cancel()
                aborting.cancel()
                if not exited.done():  # no exit reported: stop waiting for more output
                    channel.close()
        if feeding is not None:  # the container is gone: its stdin closed, the copy ends
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(feeding), _KILL_WAIT_S)
        if error is not None:
            raise error
        if failure:
            raise failure[0]
        attrs = await self._call("inspect the container", api.inspect_container, cid)
        state = attrs.get("State") or {}
        code = exited.result() if exited.done() and not exited.cancelled() else None
        if code is None and not state.get("Running"):
            code = state.get("ExitCode")
        start_ms = _parse_ms(state.get("StartedAt")) or started
        end_ms = _parse_ms(state.get("FinishedAt")) or _now_ms()
        # the engine stamps StartedAt when it has finished starting, which for a process that
        # exits at once can be a few ms after FinishedAt
        end_ms = max(end_ms, start_ms)
        return RunOutcome(
            exit_code=code,
            oom_killed=bool(state.get("OOMKilled")),
            timed_out=why == "timeout",
            stopped=why == "stop",
            started_ms=start_ms,
            ended_ms=end_ms,
            duration_ms=max(0, end_ms - start_ms),
            output_dropped_bytes=channel.dropped,
        )

    async def _terminate(
        self, cid: str, exited: asyncio.Future[int | None], grace_s: float
    ) -> None:
        """SIGTERM, ``grace_s`` to exit, then SIGKILL."""
        api = self._api()
        if grace_s > 0:
            await self._call("signal the container", _signal, api, cid, "SIGTERM")
            done, _ = await asyncio.wait({exited}, timeout=grace_s)
            if done:
                return
        await self._call("kill the container", _signal, api, cid, "SIGKILL")
        done, _ = await asyncio.wait({exited}, timeout=_KILL_WAIT_S)
        if not done:
            logger.warning(
                "container %s did not report its exit %.0f s after SIGKILL", cid[:12], _KILL_WAIT_S
            )

    async def _remove_quietly(self, cid: str) -> None:
        """Force-remove a container, to the end even if the calling task is cancelled."""
        api = self._client.api if self._client is not None else None
        if api is None:
            return
        removal = asyncio.ensure_future(asyncio.to_thread(_remove_logged, api, cid))
        await asyncio.shield(removal)


# ---- container arguments -------------------------------------------------------------------


def _container_args(spec: ContainerSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """``create_container`` and ``create_host_config`` keyword arguments for ``spec``."""
    network = _network_mode(spec.network)
    if spec.attempt < 0:
        raise InvalidDefinition("attempt", "must be 0 or more")
    for name, limit in (("pids_limit", spec.pids_limit), ("nofile", spec.nofile)):
        if limit <= 0:
            raise InvalidDefinition(name, "must be positive")
    mounts = [
        docker.types.Mount(INPUTS, str(_host_dir(spec.inputs_dir)), type="bind", read_only=True),
        docker.types.Mount(OUTPUTS, str(_host_dir(spec.outputs_dir)), type="bind", read_only=False),
    ]
    for host_path, target in spec.extra_mounts:
        mounts.append(
            docker.types.Mount(
                _container_path(target, scratch_ok=True),
                str(_host_file(host_path)),
                type="bind",
                read_only=True,
            )
        )
    for host_path, target in spec.rw_mounts:
        mounts.append(
            docker.types.Mount(
                _container_path(target, scratch_ok=True),
                str(_host_dir(host_path)),
                type="bind",
                read_only=False,
            )
        )
    env: dict[str, str] = {"HOME": "/tmp"}
    for key, value in spec.env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise InvalidDefinition("env", f"variable name {key!r} is not allowed")
        env[key] = value
    env.update(JOB_ID=spec.job_id, JOB_INPUTS=INPUTS, JOB_OUTPUTS=OUTPUTS)
    host: dict[str, Any] = {
        "mounts": mounts,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "privileged": False,
        "read_only": True,
        # exec: /outputs is a writable, executable bind anyway; noexec here would only
        # break jobs (compilers, unpacked wheels) without protecting anything.
        "tmpfs": {"/tmp": f"rw,exec,nosuid,nodev,size={spec.tmpfs_size},mode=1777"},
        "pids_limit": spec.pids_limit,
        "init": True,
        "network_mode": network,
        "ulimits": [
            docker.types.Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile),
            docker.types.Ulimit(name="core", soft=0, hard=0),
        ],
        "log_config": docker.types.LogConfig(
            type="json-file", config={"max-size": "10m", "max-file": "1"}
        ),
    }
    if spec.memory_bytes is not None:
        host["mem_limit"] = host["memswap_limit"] = spec.memory_bytes
    if spec.cpus is not None:
        host["nano_cpus"] = int(spec.cpus * 1_000_000_000)
    if spec.shm_size_bytes is not None:
        host["shm_size"] = spec.shm_size_bytes
    if spec.gpu_devices:
        host["device_requests"] = [
            docker.types.DeviceRequest(
                driver="nvidia", device_ids=list(spec.gpu_devices), capabilities=[["gpu"]]
            )
        ]
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(len(spec.gpu_devices)))
    slug = _NAME_SAFE.sub("-", spec.job_id)[:40].strip("-.") or "job"
    create: dict[str, Any] = {
        "image": spec.image,
        "command": spec.command,
        "entrypoint": spec.entrypoint,
        "environment": [f"{k}={v}" for k, v in env.items()],
        "working_dir": spec.workdir,
        "user": spec.user,
        "name": f"asman-{slug}-{spec.attempt}-{secrets.token_hex(3)}",
        "labels": {
            LABEL: "1",
            LABEL_JOB: spec.job_id,
            LABEL_QUEUE: spec.queue,
            LABEL_WORKER: spec.worker_id,
            LABEL_ATTEMPT: str(spec.attempt),
            **({LABEL_DATA_DIR: spec.data_dir} if spec.data_dir else {}),
        },
        "use_config_proxy": False,
    }
    if spec.stdin_file is not None:
        create["stdin_open"] = True
    return create, host


def _network_mode(network: str) -> str:
    if network not in ("none", "bridge"):
        raise InvalidDefinition("network", f"{network!r} is not allowed: use 'none' or 'bridge'")
    return network


def _host_dir(path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_dir():
        raise InvalidPath(str(path), "is not a folder on this worker")
    return resolved


def _host_file(path: Path) -> Path:
    """A host file to bind read-only: a regular file (or a folder a multi-step job's input
    fills), never a socket (the Docker socket)."""
    resolved = path.resolve()
    if str(resolved) in _SOCKETS or not (resolved.is_file() or resolved.is_dir()):
        raise InvalidPath(str(path), "only regular files and folders can be mounted into a job")
    return resolved


def _container_path(target: str, *, scratch_ok: bool = False) -> str:
    """A mount target: normalised, absolute, off the worker's and the kernel's folders
    (a shared folder of a multi-step job or a config file, ``scratch_ok``, may be under
    ``/tmp``, bound over its tmpfs)."""
    norm = posixpath.normpath(target)
    if not target.startswith("/") or norm != target.rstrip("/") or norm == "/":
        raise InvalidPath(target, "a mount target must be a normalized absolute path")
    for reserved in (INPUTS, OUTPUTS, "/proc", "/sys", "/dev", "/tmp"):
        if reserved == "/tmp" and scratch_ok and norm != reserved:
            continue
        if norm == reserved or norm.startswith(reserved + "/"):
            raise InvalidPath(target, f"cannot mount over {reserved}")
    if norm in RESERVED_FILES:
        raise InvalidPath(target, "is a file the container runtime writes itself")
    return norm


# ---- blocking helpers (run in threads) ------------------------------------------------------


def _create(api: Any, create: dict[str, Any], host: dict[str, Any]) -> str:
    config = api.create_host_config(**host)
    return str(api.create_container(host_config=config, **create)["Id"])


def _follow(api: Any, cid: str, stream: Any, channel: _Channel[tuple[str, bytes]]) -> int | None:
    """Stream-pool thread: forward output until the container ends, then return its exit code."""
    try:
        for out, err in stream:
            if out:
                channel.send(("stdout", out))
            if err:
                channel.send(("stderr", err))
    except Exception:
        logger.debug("output stream of %s broke", cid[:12], exc_info=True)
    finally:
        with contextlib.suppress(Exception):
            stream.close()
        with contextlib.suppress(Exception):
            # CancellableStream.close() shuts the socket but leaves the response open,
            # which leaks it (ResourceWarning); the SDK offers no public handle for this.
            stream._response.close()
        channel.close()
    try:
        return int(api.wait(cid)["StatusCode"])
    except Exception:
        logger.debug("wait for %s failed", cid[:12], exc_info=True)
        return None


def _feed_stdin(sock: Any, path: Path, cid: str) -> None:
    """Stream-pool thread: copy ``path`` (a file the worker opened and checked) to the
    container's stdin, then close it, so the process reads to its end."""
    raw = getattr(sock, "_sock", sock)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1024 * 1024):
                raw.sendall(chunk)
    except OSError:
        logger.debug("stdin of %s broke", cid[:12], exc_info=True)
    finally:
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            sock.close()
        with contextlib.suppress(OSError):
            raw.close()


def _read_all(
    open_stream: Callable[[], Iterable[_T]], channel: _Channel[_T]
) -> BaseException | None:
    try:
        for item in open_stream():
            channel.send(item)
    except Exception as exc:
        return exc
    finally:
        channel.close()
    return None


def _image_present(api: Any, image: str) -> bool:
    try:
        api.inspect_image(image)
    except docker.errors.ImageNotFound:
        return False
    return True


def _signal(api: Any, cid: str, signal: str) -> None:
    try:
        api.kill(cid, signal=signal)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if exc.status_code != 409:  # 409: not running any more
            raise


def _remove(api: Any, cid: str) -> bool:
    try:
        api.remove_container(cid, force=True, v=True)
    except docker.errors.NotFound:
        return False
    except docker.errors.APIError as exc:
        if exc.status_code == 409 and "already in progress" in str(exc.explanation):
            return False
        raise
    return True


def _remove_logged(api: Any, cid: str) -> None:
    try:
        _remove(api, cid)
    except Exception:
        logger.warning("could not remove container %s", cid[:12], exc_info=True)


# ---- small helpers -------------------------------------------------------------------------


class _Channel(Generic[_T]):
    """Carries items from one reader thread to the loop without ever blocking the reader.

    At most ``limit`` units (``size(item)``: bytes for output, 1 per event otherwise) wait
    for the consumer; beyond that, items are dropped and their units counted in ``dropped``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        limit: int,
        size: Callable[[_T], int] = lambda item: 1,
    ) -> None:
        self._loop = loop
        self._limit = limit
        self._size = size
        self._queue: asyncio.Queue[tuple[_T] | None] = asyncio.Queue()
        self._pending = 0
        self._closed = False
        self.dropped = 0

    def send(self, item: _T) -> None:
        """Reader thread: hand over one item."""
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self._loop.call_soon_threadsafe(self._put, item)

    def close(self) -> None:
        """Reader thread or loop: no more items."""
        if self._loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._end()
        else:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._end)

    def _put(self, item: _T) -> None:
        size = self._size(item)
        if self._closed:
            return
        if self._pending + size > self._limit:
            self.dropped += size
            return
        self._pending += size
        self._queue.put_nowait((item,))

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[_T]:
        while (box := await self._queue.get()) is not None:
            self._pending -= self._size(box[0])
            yield box[0]


async def _aclose(events: AsyncIterator[Any]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def _emit(on_log: LogCallback | None, tail: deque[str], line: str) -> None:
    tail.append(line)
    if on_log is not None:
        await on_log(line)


def _pull_line(event: Mapping[str, Any]) -> str:
    """One line for a pull event, or "" for byte-progress noise."""
    if event.get("progressDetail", {}).get("current") is not None:
        return ""
    status = str(event.get("status", "")).strip()
    return f"{event['id']}: {status}" if event.get("id") else status


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _parse_ms(stamp: Any) -> int | None:
    """Epoch ms of a Docker RFC 3339 time; None for Go's zero time or garbage."""
    if not isinstance(stamp, str) or stamp.startswith("0001-"):
        return None
    try:
        return int(datetime.fromisoformat(stamp).timestamp() * 1000)
    except ValueError:
        return None


def _inside(root: Path, relative: str, problem: str) -> Path:
    """``root / relative``, refusing absolute paths and anything resolving outside ``root``."""
    if relative.startswith("/") or "\0" in relative:
        raise InvalidPath(relative, problem)
    base = root.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):
        raise InvalidPath(relative, problem)
    return path
