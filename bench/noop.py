"""A runtime that runs nothing: **benchmark-only**.

``NoopRuntime`` satisfies ``asman.peer.runtime.Runtime`` and answers every job at once with exit
code 0, so the queue-path benchmarks measure Asman's log work (fetch, claim, start, finish, ack)
and not Docker. It must never be used to serve a real queue: it would finish every job as a
success without running it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from asman.log.events import now_ms
from asman.peer import docker
from asman.peer.docker import ContainerSpec, RunOutcome

__all__ = ["NoopRuntime"]


class NoopRuntime:
    """Benchmark-only ``Runtime``: no image, no container, an instant success."""

    #: Nothing is mounted, so the worker makes no job folder for it.
    mounts_folders = False

    def __init__(self) -> None:
        self.runs = 0

    async def __aenter__(self) -> NoopRuntime:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def ensure_image(self, image: str, on_log: Callable[[str], Awaitable[None]]) -> None:
        return None

    async def build(
        self,
        build: docker.BuildSpec,
        *,
        work_dir: Path,
        fetch_context: Callable[[str, Path], Awaitable[Path]] | None,
        on_log: Callable[[str], Awaitable[None]],
        network: str = "none",
        memory_bytes: int | None = None,
        cpus: float | None = None,
    ) -> str:
        return "noop"

    async def run(
        self,
        spec: ContainerSpec,
        *,
        on_output: Callable[[str, bytes], Awaitable[None]] | None,
        stop: asyncio.Event,
        timeout_s: float | None,
        grace_s: float = 10.0,
    ) -> RunOutcome:
        self.runs += 1
        t = now_ms()
        return RunOutcome(
            exit_code=0,
            oom_killed=False,
            timed_out=False,
            stopped=False,
            started_ms=t,
            ended_ms=t,
            duration_ms=0,
        )

    async def cleanup_orphans(
        self, worker_id: str | None = None, *, abandoned: Callable[[str], bool] | None = None
    ) -> int:
        return 0
