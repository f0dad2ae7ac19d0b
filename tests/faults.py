"""Fault injection for tests, with real processes and a real network path (issue 17).

- ``LinkProxy``: a TCP proxy on 127.0.0.1 between one NATS client and its nats-server that
  reads the NATS protocol both ways, so a test can drop chosen publishes, or let one through
  and cut the connection before its acknowledgement comes back (the reply lost on the way),
  or cut every connection at once. The server and the client are the real ones.
- ``Cli``: ``asman`` subprocesses (a worker to SIGTERM, SIGKILL or SIGSTOP), stopped by PID.
- Waits on the things themselves: a job's state on the log (``until``), a worker's heartbeats
  (``heartbeats``), Docker's container events (``running_containers``, ``wait_removed``).

Points in a job's life are reached by watching the log and Docker, never by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from asman.log import jobs, subjects
from asman.log.connection import Log
from asman.log.events import JobState

ASMAN = str(Path(sys.executable).parent / "asman")

#: short rules for fault tests, written into the streams by the first client: a silent holder
#: is challenged once its heartbeat is 3 s old and loses the lease 2 s later
LEASE_S, HEARTBEAT_TTL_S = 2.0, 3.0

#: (subject, payload) → whether the rule applies to this client publish
PubRule = Callable[[str, bytes], bool]


# ---- the network path ---------------------------------------------------------------------


async def _frames(reader: asyncio.StreamReader) -> AsyncIterator[tuple[bytes, bytes]]:
    """NATS protocol frames: (control line, payload with its CRLF, or b'')."""
    while True:
        line = await reader.readline()
        if not line:
            return
        op = line.split(b" ", 1)[0].strip().upper()
        if op in (b"PUB", b"HPUB", b"MSG", b"HMSG"):
            size = int(line.split()[-1])
            yield line, await reader.readexactly(size + 2)
        else:
            yield line, b""


def _subject_and_reply(line: bytes) -> tuple[str, str]:
    """The subject and reply subject of a PUB/HPUB (client) or MSG/HMSG (server) line."""
    parts = line.decode().split()
    op = parts[0].upper()
    # PUB subj [reply] n, HPUB subj [reply] h n, MSG subj sid [reply] n, HMSG subj sid [reply] h n
    fixed = {"PUB": 3, "HPUB": 4, "MSG": 4, "HMSG": 5}[op]
    reply_at = 2 if op in ("PUB", "HPUB") else 3
    return parts[1], parts[reply_at] if len(parts) > fixed else ""


@dataclass
class LinkProxy:
    """A proxy on 127.0.0.1 in front of the nats-server at ``upstream_port``.

    ``drop(rule, times)``: the next ``times`` client publishes the rule matches never reach
    the server. ``lose_reply(rule)``: the next publish it matches reaches the server, the
    server's answer is swallowed, and the connection is cut (the client reconnects through
    the proxy); ``reply_lost`` is set then. ``race(rule, times)``: another writer gets there
    first each time. ``cut()`` closes every connection now.
    """

    upstream_port: int
    dropped: list[str] = field(default_factory=list)
    reply_lost: asyncio.Event = field(default_factory=asyncio.Event)
    connections: int = 0
    _drop: tuple[PubRule, int] | None = None
    _lose: PubRule | None = None
    _race: tuple[PubRule, int] | None = None
    raced: int = 0
    _server: asyncio.Server | None = None
    _links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=set)

    async def start(self) -> LinkProxy:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"nats://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def drop(self, rule: PubRule, times: int = 1) -> None:
        self._drop = (rule, times)

    def race(self, rule: PubRule, times: int = 1) -> None:
        """The next ``times`` publishes the rule matches are each preceded on the server by a
        junk message on the same subject: a writer that always gets there first, so every
        compare-and-set on the subject's last sequence fails."""
        self._race = (rule, times)

    def lose_reply(self, rule: PubRule) -> None:
        self.reply_lost.clear()
        self._lose = rule

    def cut(self) -> None:
        for client, server in list(self._links):
            client.close()
            server.close()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _link(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.connections += 1
        pair = (c_writer, s_writer)
        self._links.add(pair)
        awaited_reply: list[str] = []  # the reply subject whose answer is to be lost

        async def client_to_server() -> None:
            async for line, payload in _frames(c_reader):
                if line[:4].upper() in (b"PUB ", b"HPUB"):
                    subject, reply = _subject_and_reply(line)
                    if self._drop is not None and self._drop[0](subject, payload):
                        rule, left = self._drop
                        self._drop = (rule, left - 1) if left > 1 else None
                        self.dropped.append(subject)
                        continue
                    if self._race is not None and self._race[0](subject, payload):
                        rule, left = self._race
                        self._race = (rule, left - 1) if left > 1 else None
                        self.raced += 1
                        s_writer.write(f"PUB {subject} 4\r\njunk\r\n".encode())
                    if self._lose is not None and reply and self._lose(subject, payload):
                        self._lose = None
                        awaited_reply.append(reply)
                s_writer.write(line + payload)
                await s_writer.drain()

        async def server_to_client() -> None:
            async for line, payload in _frames(s_reader):
                if (
                    awaited_reply
                    and line[:4].upper() in (b"MSG ", b"HMSG")
                    and _subject_and_reply(line)[0] == awaited_reply[0]
                ):
                    self.reply_lost.set()  # the server answered; the client never hears
                    return
                c_writer.write(line + payload)
                await c_writer.drain()

        tasks = [asyncio.create_task(client_to_server()), asyncio.create_task(server_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await t
            self._links.discard(pair)
            for w in pair:
                w.close()


def event_of(kind: str, subject_part: str = "") -> PubRule:
    """A rule for a job event publish: ``kind`` (``claimed``, ``finished``…) appears in the
    CBOR payload as text, on a subject containing ``subject_part`` (e.g. the job id)."""
    needle = kind.encode()

    def rule(subject: str, payload: bytes) -> bool:
        return subject_part in subject and needle in payload

    return rule


# ---- processes ----------------------------------------------------------------------------


class Cli:
    """``asman`` subprocesses of one test, each with its output in a file; stopped by PID."""

    def __init__(self, home: Path, nats_url: str, *, verbose: bool = True) -> None:
        self.home = home
        self.verbose = ["-v"] if verbose else []
        self.env = {
            **os.environ,
            "HOME": str(home),
            "ASMAN_NATS_URL": nats_url,
            "XDG_CONFIG_HOME": str(home / "config"),
            "XDG_DATA_HOME": str(home / "data"),
        }
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *args: str, log: str) -> subprocess.Popen[bytes]:
        with open(self.home / log, "wb") as out:  # the child has its own copy of the fd
            proc = subprocess.Popen(
                [ASMAN, *self.verbose, *args], env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    def run(
        self, *args: str, timeout: float = 120, cwd: Path | None = None, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        """One ``asman`` command to its end, its output captured."""
        return subprocess.run(
            [ASMAN, *args],
            env=self.env,
            capture_output=True,
            timeout=timeout,
            cwd=cwd or self.home,
            input=stdin,
        )

    def log(self, name: str) -> str:
        return (self.home / name).read_text(errors="replace")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)  # a paused one must be able to stop
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


class Announcing:
    """A long-running process whose output a thread copies to ``log``, line by line; ``seen``
    is set by the first line that matches ``ready`` (a regular expression), or when the
    output ends (it exited: look at ``text()``)."""

    def __init__(
        self,
        argv: list[str],
        log: Path,
        ready: str,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.log = log
        self.seen = threading.Event()
        self.ready = re.compile(ready)
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        self.thread = threading.Thread(target=self._copy, daemon=True)
        self.thread.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout, self.log.open("wb") as out:
            for line in self.proc.stdout:
                out.write(line)
                out.flush()
                if self.ready.search(line.decode(errors="replace")):
                    self.seen.set()
        self.seen.set()

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Signal it (SIGTERM), wait for its end; killed if it outlives ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# ---- teardown ------------------------------------------------------------------------------


async def stopped(task: asyncio.Future[Any], what: str, timeout: float = 30) -> list[str]:
    """Wait for a teardown step (a worker's or a gateway's task told to stop); what went
    wrong with it, if anything: it crashed, was cancelled, or hung (then every task's stack
    is printed and it is cancelled). Teardowns collect these and fail the test."""
    try:
        async with asyncio.timeout(timeout):
            await asyncio.shield(task)
    except TimeoutError:
        print(f"teardown: {what} did not finish in {timeout}s; tasks:")
        for t in asyncio.all_tasks():
            t.print_stack(file=sys.stdout)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            return [f"{what} did not stop within {timeout}s, nor when cancelled"]
        end = None if task.cancelled() else task.exception()
        return [f"{what} did not stop within {timeout}s" + (f" (then {end!r})" if end else "")]
    except asyncio.CancelledError:
        if not task.cancelled():
            raise  # the test itself is being cancelled
        return [f"{what} was cancelled"]
    except Exception as exc:
        traceback.print_exception(exc, file=sys.stdout)
        return [f"{what} ended with {exc!r}"]
    return []


# ---- waiting on the log --------------------------------------------------------------------


async def heartbeats(client: Log, queue: str, count: int, timeout: float = 60) -> set[str]:
    """Until ``count`` worker processes beat on ``queue``: their subjects' last tokens."""
    seen: set[str] = set()
    got = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        seen.add(msg.subject.rsplit(".", 1)[-1])
        if len(seen) >= count:
            got.set()

    sub = await client.nc.subscribe(subjects.workers_filter(queue), cb=on_beat)
    try:
        await asyncio.wait_for(got.wait(), timeout)
    finally:
        await sub.unsubscribe()
    return seen


async def until(
    client: Log, queue: str, job: str, pred: Callable[[JobState], bool], timeout: float = 60
) -> JobState:
    """The job's first state (on the log) for which ``pred`` holds; fails after ``timeout``."""
    async with asyncio.timeout(timeout):
        async for state in jobs.watch_job(client, queue, job):
            if pred(state):
                return state
    raise AssertionError(f"job {job} ended before the awaited state")


def accepted(state: JobState) -> list[str]:
    """The types of the job's events the fold accepted, in order."""
    return [h.type for h in state.history if h.accepted]


# ---- waiting on Docker ---------------------------------------------------------------------


def running_containers(job: str, timeout: float = 60) -> list[str]:
    """The ids of ``job``'s containers once one runs (Docker's ``start`` events)."""
    api = docker.from_env()
    try:
        since = time.time() - 60
        label = {"label": f"asman.job={job}"}
        found = api.containers.list(filters={**label, "status": "running"})
        if found:
            return [c.id for c in found]
        events = api.events(
            since=int(since), until=int(time.time() + timeout), decode=True,
            filters={"type": "container", "event": "start", **label},
        )  # fmt: skip
        for event in events:
            return [event["id"]]
        raise AssertionError(f"no container of job {job} started in {timeout}s")
    finally:
        api.close()


def _until_events(
    api: Any, kind: str, since: float, timeout: float, left: Callable[[], set[str]], what: str
) -> None:
    """Until ``left()`` is empty, looking again at each of Docker's container ``kind`` events
    from ``since`` (a replay first, so none is missed, then live ones)."""
    if not left():
        return
    events = api.events(
        since=int(since), until=int(time.time() + timeout), decode=True,
        filters={"type": "container", "event": kind},
    )  # fmt: skip
    try:
        for _ in events:
            if not left():
                return
    finally:
        events.close()
    raise AssertionError(f"containers still {what} after {timeout}s: {sorted(left())}")


def wait_removed(ids: list[str], since: float, timeout: float = 60) -> None:
    """Until Docker has destroyed every container of ``ids`` (its events from ``since``)."""
    api = docker.from_env()
    try:
        _until_events(
            api, "destroy", since, timeout, lambda: {i for i in ids if _exists(api, i)}, "there"
        )
    finally:
        api.close()


def wait_exited(ids: list[str], since: float, timeout: float = 60) -> None:
    """Until every container of ``ids`` has stopped running (``die`` events from ``since``)."""
    api = docker.from_env()

    def running() -> set[str]:
        out = set()
        for i in ids:
            with contextlib.suppress(docker.errors.NotFound):
                if api.containers.get(i).status == "running":
                    out.add(i)
        return out

    try:
        _until_events(api, "die", since, timeout, running, "running")
    finally:
        api.close()


def _exists(api: Any, container_id: str) -> bool:
    try:
        api.containers.get(container_id)
    except docker.errors.NotFound:
        return False
    return True
