"""``asman worker --procs N``: N worker processes under one supervisor.

This is the prefork model users know from Celery and Dramatiq, for two reasons. One Python
process drives one core: on a host with several, N processes drain a queue about N times as
fast as one. And a process is a wall: a fault that escapes the exception boundary around a job
(a bug in a library, memory exhausted in the worker itself) ends one process, never the
worker.

Each process is a whole worker, with the same key (one identity on the log), the same queues
and settings, its own log session (the lease rules tell the processes apart by it) and its own
data dir, ``<data-dir>/procs/<i>``, which it locks. The supervisor locks ``<data-dir>`` itself,
runs no job and holds no lease. When a process dies it is started again on the same data dir:
the new process removes the containers the dead one left (they carry its data dir's label),
and the dead one's jobs go back through the lease rules (a sibling finds no heartbeat for the
holder, challenges it and takes the job over after the grace; the attempt counts, so a job
that kills its process every time ends ``worker_lost`` after the allowed attempts). A process
that dies young is restarted after a pause that doubles each time, up to
``MAX_RESTART_PAUSE_S``, so that a process that cannot start does not spin.

On SIGTERM or SIGINT the supervisor passes SIGTERM on and waits for every process's drain; one
that has not ended ``KILL_AFTER_S`` past its drain grace is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.context
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from asman.config import ClientSettings
from asman.errors import AsmanError, ConfigError
from asman.logsetup import configure_logging
from asman.peer.jobdir import DataDirLock
from asman.peer.worker import WorkerConfig

__all__ = ["ProcSpec", "Supervisor", "serve_worker"]

logger = logging.getLogger(__name__)

#: a process that lived less than this is restarted after a growing pause
YOUNG_S = 10.0
FIRST_RESTART_PAUSE_S = 0.5
MAX_RESTART_PAUSE_S = 30.0
#: past a process's drain grace, how long the supervisor waits before it kills it
KILL_AFTER_S = 30.0


#: the runtime of every worker process, as ``module:class`` (a benchmark names another)
DOCKER_RUNTIME = "asman.peer.docker:DockerRuntime"


def _runtime(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)()


async def serve_worker(
    settings: ClientSettings,
    config: WorkerConfig,
    stop: asyncio.Event,
    announce: Callable[[str], None] | None = None,
    *,
    runtime: str = DOCKER_RUNTIME,
) -> None:
    """Connect to the log, the blob store and the Docker engine, and run one worker until
    ``stop``."""
    from asman.peer.client import Client
    from asman.peer.worker import Worker

    async with (
        Client.connect(settings, name="asman-worker", echo=False) as client,
        _runtime(runtime) as runtime_,
    ):
        await runtime_.ping()
        client.log.cert = config.cert
        if announce is not None:
            announce(
                f"worker {client.peer_id[:12]} on {', '.join(config.queues)} "
                f"({config.slots} slot(s), network {config.network})"
            )
        await Worker(client.log, client.blobs, runtime_, config).run(stop)


@dataclass(frozen=True, slots=True)
class ProcSpec:
    """What one worker process needs, sent to it whole (it is started afresh, not forked)."""

    index: int
    procs: int
    settings: ClientSettings
    config: WorkerConfig
    verbose: int
    log_format: str
    runtime: str = DOCKER_RUNTIME


def proc_main(spec: ProcSpec) -> None:
    """The entry point of one worker process: its exit code is the supervisor's only news
    of how it ended (an error is logged as one line first)."""
    configure_logging(spec.verbose, spec.log_format, proc=f"{spec.index}/{spec.procs}")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_worker(spec.settings, spec.config, stop, runtime=spec.runtime)

    try:
        asyncio.run(main())
    except AsmanError as exc:
        logger.error("%s", exc)
        raise SystemExit(exc.exit_code) from None


@dataclass(slots=True)
class _Proc:
    index: int
    process: multiprocessing.process.BaseProcess | None = None
    started: float = 0.0
    pause_s: float = FIRST_RESTART_PAUSE_S
    restarts: int = 0


class Supervisor:
    """Runs ``procs`` worker processes until stopped; see the module docstring."""

    def __init__(
        self,
        settings: ClientSettings,
        config: WorkerConfig,
        procs: int,
        *,
        verbose: int = 0,
        log_format: str = "text",
        runtime: str = DOCKER_RUNTIME,
    ) -> None:
        if procs < 1:
            raise ConfigError(f"--procs must be at least 1, got {procs}")
        if config.once:
            raise ConfigError("--once runs one job in one process: use it without --procs")
        self.settings = settings
        self.config = config
        self.procs = procs
        self.verbose = verbose
        self.log_format = log_format
        self.runtime = runtime
        self._ctx = multiprocessing.get_context("spawn")
        self._slots = [_Proc(i) for i in range(procs)]
        #: set whenever a process ends (tests and the drain wait on it)
        self.changed = asyncio.Event()

    def data_dir(self, index: int) -> Path:
        return self.config.data_dir / "procs" / str(index)

    def pids(self) -> list[int | None]:
        """The pid of each process, None while one is being restarted."""
        return [p.process.pid if p.process and p.process.is_alive() else None for p in self._slots]

    def restarts(self) -> list[int]:
        return [p.restarts for p in self._slots]

    def _spec(self, index: int) -> ProcSpec:
        config = replace(
            self.config,
            data_dir=self.data_dir(index),
            cache_dir=self.config.data_dir / "cache",
            procs=self.procs,
            gpus=self.config.gpus[index :: self.procs],  # each GPU to one process
        )
        return ProcSpec(
            index, self.procs, self.settings, config, self.verbose, self.log_format, self.runtime
        )

    def _start(self, slot: _Proc) -> None:
        self.data_dir(slot.index).mkdir(parents=True, exist_ok=True)
        process = self._ctx.Process(
            target=proc_main, args=(self._spec(slot.index),), name=f"asman-worker-{slot.index}"
        )
        process.start()
        slot.process, slot.started = process, time.monotonic()
        logger.info("worker process %d started (pid %s)", slot.index, process.pid)

    async def run(self, stop: asyncio.Event) -> int:
        """Start the processes, keep them running until ``stop``, then stop them all.
        Returns 0, or 1 when a process had to be killed."""
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        with DataDirLock(self.config.data_dir):
            for slot in self._slots:
                self._start(slot)
            try:
                await self._watch(stop)
            finally:
                killed = await self._stop_all()
        return 1 if killed else 0

    async def _ended(self, slot: _Proc) -> None:
        """Until the slot's process has ended (its sentinel becomes readable)."""
        assert slot.process is not None
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        fd = slot.process.sentinel

        def ended() -> None:
            if not done.done():
                done.set_result(None)

        loop.add_reader(fd, ended)
        try:
            await done
        finally:
            loop.remove_reader(fd)
        slot.process.join()

    async def _watch(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as tg:
            for slot in self._slots:
                tg.create_task(self._keep(slot, stop))

    async def _keep(self, slot: _Proc, stop: asyncio.Event) -> None:
        """Keep ``slot``'s process running until ``stop``."""
        while True:
            assert slot.process is not None
            ended = asyncio.ensure_future(self._ended(slot))
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait([ended, stopping], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopping.cancel()
                if not ended.done():
                    ended.cancel()
                    await asyncio.wait([ended])
            if stop.is_set():
                return
            self.changed.set()
            code = slot.process.exitcode
            lived = time.monotonic() - slot.started
            slot.pause_s = FIRST_RESTART_PAUSE_S if lived >= YOUNG_S else slot.pause_s
            logger.warning(
                "worker process %d (pid %s) ended with %s after %.0fs; restarting in %.1fs "
                "(its jobs go back to the queue through the lease rules)",
                slot.index,
                slot.process.pid,
                _describe(code),
                lived,
                slot.pause_s,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(slot.pause_s):
                    await stop.wait()
            if stop.is_set():
                return
            if lived < YOUNG_S:
                slot.pause_s = min(slot.pause_s * 2, MAX_RESTART_PAUSE_S)
            slot.restarts += 1
            self._start(slot)

    async def _stop_all(self) -> bool:
        """SIGTERM to every process, then wait for their drains; kill the late ones."""
        alive = [s for s in self._slots if s.process is not None and s.process.is_alive()]
        for slot in alive:
            assert slot.process is not None and slot.process.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(slot.process.pid, signal.SIGTERM)
        killed = False
        deadline = time.monotonic() + self.config.drain_grace_s + KILL_AFTER_S
        for slot in alive:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await asyncio.shield(self._ended(slot))
            except TimeoutError:
                assert slot.process is not None
                logger.error("worker process %d did not stop in time: killed", slot.index)
                slot.process.kill()
                slot.process.join()
                killed = True
        self.changed.set()
        return killed


def _describe(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"exit code {code}"
