"""GPU scheduling through the real worker, a real nats-server and real containers.

This machine has no GPU (and no NVIDIA container runtime), so the runtime here is the real
``DockerRuntime`` with one change: it records the device request each container would get
(built by ``asman.peer.docker``'s own argument builder, as the engine would receive it) and
then runs the container without it. Everything else is real: the worker's GPU accounting,
the log, the claims, the containers. What is checked is which devices each job was given,
when, and by which worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.events import JobState
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.peer.docker import ContainerSpec, DockerRuntime, RunOutcome, _container_args
from asman.peer.worker import Worker, WorkerConfig

pytestmark = pytest.mark.docker

IMAGE = "asman/busybox:local"
QUEUE = "gpus"


def gpu_job(gpus: int, command: str) -> dict[str, Any]:
    return {"image": IMAGE, "command": ["sh", "-c", command], "requirements": {"gpus": gpus}}


@dataclass
class Run:
    """One container the runtime ran: the devices its request named, and when (monotonic)."""

    job_id: str
    attempt: int
    devices: tuple[str, ...]
    cuda_visible: str | None
    started: float
    ended: float | None = None


class RecordingRuntime(DockerRuntime):
    """The real Docker runtime minus the GPU device request this machine cannot honour:
    records the request, runs the container without it."""

    def __init__(self, changed: asyncio.Event) -> None:
        super().__init__()
        self.runs: list[Run] = []
        self.changed = changed

    async def run(self, spec: ContainerSpec, **kwargs: Any) -> RunOutcome:
        create, host = _container_args(spec)  # what the engine would be sent
        devices = tuple(d for req in host.get("device_requests", []) for d in req.device_ids)
        env = dict(e.split("=", 1) for e in create["environment"])
        record = Run(
            spec.job_id, spec.attempt, devices, env.get("CUDA_VISIBLE_DEVICES"), time.monotonic()
        )
        self.runs.append(record)
        self.changed.set()
        try:
            return await super().run(dataclasses.replace(spec, gpu_devices=()), **kwargs)
        finally:
            record.ended = time.monotonic()
            self.changed.set()

    def of(self, job_id: str) -> list[Run]:
        return [r for r in self.runs if r.job_id == job_id]


class GpuWorkers:
    """Workers with recording runtimes on one queue, and a client (the submitter)."""

    def __init__(self, nats_url: str, tmp: Path) -> None:
        self.nats_url = nats_url
        self.tmp = tmp
        self.changed = asyncio.Event()  # set whenever any runtime starts or ends a container
        self.logs: list[Log] = []
        self.started: list[tuple[Worker, asyncio.Event, asyncio.Task[None]]] = []

    async def log(self) -> Log:
        log = Log(LogConfig(servers=(self.nats_url,)), PeerKey.generate())
        await log.connect()
        self.logs.append(log)
        return log

    async def worker(self, gpus: tuple[str, ...], slots: int) -> tuple[Worker, RecordingRuntime]:
        log = await self.log()
        blobs = ObjectStoreBlobs(log.js)
        await blobs.ensure()
        runtime = RecordingRuntime(self.changed)
        await runtime.__aenter__()
        config = WorkerConfig(
            queues=(QUEUE,),
            data_dir=self.tmp / f"worker{len(self.started)}",
            slots=slots,
            gpus=gpus,
            drain_grace_s=5.0,
            kill_grace_s=1.0,
            heartbeat_s=1.0,
        )
        worker = Worker(log, blobs, runtime, config)
        stop = asyncio.Event()

        async def run() -> None:
            try:
                await worker.run(stop)
            finally:
                await runtime.__aexit__(None, None, None)

        self.started.append((worker, stop, asyncio.create_task(run())))
        await asyncio.wait_for(worker.beaten.wait(), 30)  # the others see it from now on
        return worker, runtime

    async def wait_runs(
        self, condition: Callable[[], bool], what: str, timeout: float = 60
    ) -> None:
        """Until ``condition()`` holds, woken by the runtimes' own starts and ends."""
        try:
            async with asyncio.timeout(timeout):
                while not condition():
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            pytest.fail(f"{what}: not after {timeout:.0f}s")

    async def close(self) -> None:
        """Stop the workers; fail if one crashed, ended with an exception or hung."""
        failures = []
        for _, stop, _ in self.started:
            stop.set()
        for worker, _, task in self.started:
            done, _ = await asyncio.wait([task], timeout=30)
            if not done:
                task.cancel()
                await asyncio.wait([task], timeout=30)
                failures.append(f"worker {worker.worker_id[:12]} did not stop")
            elif not task.cancelled() and (exc := task.exception()) is not None:
                failures.append(f"worker {worker.worker_id[:12]} ended with {exc!r}")
        for log in self.logs:
            await log.close()
        assert not failures, failures


@pytest.fixture
async def fleet(nats_url: str, tmp_path: Path, busybox_image: str) -> AsyncIterator[GpuWorkers]:
    workers = GpuWorkers(nats_url, tmp_path)
    try:
        yield workers
    finally:
        await workers.close()


async def beats(worker: Worker, rounds: int) -> None:
    """Until ``worker`` has gone round its loops ``rounds`` more times (its heartbeats)."""
    for _ in range(rounds):
        worker.beaten.clear()
        await asyncio.wait_for(worker.beaten.wait(), 30)


def claimers(state: JobState) -> set[str]:
    """Every key that wrote a claim on the job (accepted or not)."""
    return {h.signer for h in state.history if h.type == "claimed"}


async def test_one_gpu_jobs_share_a_worker_on_different_devices_and_a_third_waits(
    fleet: GpuWorkers,
) -> None:
    """A worker with GPUs 0 and 1 (and a slot to spare) runs two 1-GPU jobs at once, one on
    each device; a third waits while both are busy, and runs on the device that frees."""
    worker, runtime = await fleet.worker(gpus=("0", "1"), slots=3)
    client = await fleet.log()
    first = (await jobs.submit(client, QUEUE, gpu_job(1, "sleep 60"))).job_id
    second = (await jobs.submit(client, QUEUE, gpu_job(1, "sleep 61"))).job_id

    def running(job: str) -> bool:
        return any(r.ended is None for r in runtime.of(job))

    await fleet.wait_runs(lambda: running(first) and running(second), "both 1-GPU jobs running")
    (run1,), (run2,) = runtime.of(first), runtime.of(second)
    assert {run1.devices, run2.devices} == {("0",), ("1",)}
    assert run1.cuda_visible == run2.cuda_visible == "0"  # each sees its one device as 0

    third = (await jobs.submit(client, QUEUE, gpu_job(1, "echo third > /outputs/t"))).job_id
    await beats(worker, 2)  # the worker has seen it, and has a free slot, but no free GPU
    waiting = await jobs.read_job(client, QUEUE, third)
    assert waiting is not None and waiting.state == "queued" and waiting.claims == 0
    assert runtime.of(third) == []

    await jobs.cancel(client, QUEUE, first)  # its container stops: GPU run1.devices frees
    done = await jobs.wait_finished(client, QUEUE, third, timeout=60)
    assert done.reason == "success" and claimers(done) == {worker.worker_id}
    (run3,) = runtime.of(third)
    assert run3.devices == run1.devices  # the freed device, not the busy one
    assert run1.ended is not None and run3.started >= run1.ended
    assert running(second)  # the other device was busy all along
    cancelled = await jobs.wait_finished(client, QUEUE, first, timeout=30)
    assert cancelled.reason == "cancelled"
    await jobs.cancel(client, QUEUE, second)


async def test_a_job_wanting_more_gpus_than_a_worker_has_goes_to_one_that_has_them(
    fleet: GpuWorkers,
) -> None:
    """A 2-GPU job on a queue with a 1-GPU worker (idle) and a 2-GPU worker (busy): the
    1-GPU worker never claims it; the 2-GPU worker runs it once free, on both devices."""
    big, big_runtime = await fleet.worker(gpus=("0", "1"), slots=1)
    client = await fleet.log()
    blocker = (await jobs.submit(client, QUEUE, gpu_job(2, "sleep 60"))).job_id
    await fleet.wait_runs(lambda: bool(big_runtime.of(blocker)), "the 2-GPU worker busy")
    small, small_runtime = await fleet.worker(gpus=("2",), slots=1)

    wanted = (await jobs.submit(client, QUEUE, gpu_job(2, "echo both > /outputs/b"))).job_id
    await beats(small, 2)  # the idle 1-GPU worker has seen it
    waiting = await jobs.read_job(client, QUEUE, wanted)
    assert waiting is not None and waiting.state == "queued" and waiting.claims == 0

    await jobs.cancel(client, QUEUE, blocker)  # the 2-GPU worker frees up
    done = await jobs.wait_finished(client, QUEUE, wanted, timeout=60)
    assert done.reason == "success"
    assert done.result is not None and done.result.worker == big.worker_id
    assert claimers(done) == {big.worker_id}  # never claimed (nor released) by the small one
    (run,) = big_runtime.of(wanted)
    assert run.devices == ("0", "1") and run.cuda_visible == "0,1"
    assert small_runtime.runs == []
