"""What runs a job's container, as the worker sees it: the ``Runtime`` protocol.

``DockerRuntime`` (``asman.peer.docker``) is the real runtime; the benchmarks' ``NoopRuntime``
(``bench/noop.py``) is one that runs nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from asman.log.definition import BuildSpec
from asman.peer import docker
from asman.peer.docker import ContainerSpec, RunOutcome

__all__ = ["OnLog", "OnOutput", "Runtime", "docker_build", "mounts_folders"]

OnOutput = Callable[[str, bytes], Awaitable[None]]
OnLog = Callable[[str], Awaitable[None]]


class Runtime(Protocol):
    """What runs a job's container. ``DockerRuntime`` is the real one.

    ``mounts_folders``: the runtime binds the attempt's host folders (``inputs_dir``,
    ``outputs_dir``) into the job; the worker makes them, fills the inputs and collects the
    outputs only then. A runtime that mounts nothing costs no folder, no thread hop.
    """

    mounts_folders: bool

    async def ensure_image(self, image: str, on_log: OnLog) -> None: ...

    async def build(
        self,
        build: docker.BuildSpec,
        *,
        work_dir: Path,
        fetch_context: Callable[[str, Path], Awaitable[Path]] | None,
        on_log: OnLog,
        network: str = "none",
        memory_bytes: int | None = None,
        cpus: float | None = None,
    ) -> str: ...

    async def run(
        self,
        spec: ContainerSpec,
        *,
        on_output: OnOutput | None,
        stop: asyncio.Event,
        timeout_s: float | None,
        grace_s: float = 10.0,
    ) -> RunOutcome: ...

    async def cleanup_orphans(
        self, worker_id: str | None = None, *, abandoned: Callable[[str], bool] | None = None
    ) -> int: ...


def mounts_folders(runtime: Runtime) -> bool:
    """Whether ``runtime`` binds the attempt's folders (a runtime that does not say does)."""
    return bool(getattr(runtime, "mounts_folders", True))


def docker_build(b: BuildSpec) -> docker.BuildSpec:
    return docker.BuildSpec(
        dockerfile=b.dockerfile,
        context=b.context,
        build_context=b.build_context or ".",
        filename=b.filename,
        target=b.target,
        platform=b.platform,
        build_args=dict(b.build_args),
    )
