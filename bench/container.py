"""Container path: `true` jobs end to end through Asman vs the same container run directly.

Asman: a ``Worker`` with the real ``DockerRuntime`` (1 slot, data dir on the normal disk)
runs N jobs submitted one at a time; per job, the time from ``jobs.submit`` to the verified
``finished`` event reaching a subscribing client (inputs dir, outputs dir, hardened container
create/attach/start/wait/inspect/remove, log stored, signed events).

Direct: the docker SDK (low-level API, as ``docker run --rm`` does it) creates, starts, waits
for and removes the very same container: the arguments come from the runtime's own
``_container_args`` for an equivalent ``ContainerSpec`` (cap-drop ALL, no-new-privileges,
read-only root, tmpfs /tmp, pids/nofile limits, init, network none, user 65534, the two bind
mounts). The runs alternate, Asman then direct, so both see the same load.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import docker as docker_sdk
from nats.aio.msg import Msg

from asman.errors import EnvelopeError
from asman.log import jobs, subjects, wire
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.objstore import ObjectStoreBlobs
from asman.peer.docker import ContainerSpec, DockerRuntime, _container_args
from asman.peer.worker import Worker, WorkerConfig
from bench.common import log, median, nats_server, percentile, scratch, table

IMAGE = "asman/busybox:local"
QUEUE = "container"


def _direct_run(api: Any, spec: ContainerSpec) -> int:
    create, host = _container_args(spec)
    cid = api.create_container(host_config=api.create_host_config(**host), **create)["Id"]
    try:
        api.start(cid)
        return int(api.wait(cid)["StatusCode"])
    finally:
        api.remove_container(cid, force=True, v=True)


async def run(n: int = 30) -> dict[str, Any]:
    asman_s: list[float] = []
    direct_s: list[float] = []
    api = docker_sdk.from_env().api
    with nats_server("container") as server, scratch("container") as work:
        inputs, outputs = work / "direct" / "inputs", work / "direct" / "outputs"
        inputs.mkdir(parents=True)
        outputs.mkdir(parents=True)
        outputs.chmod(0o777)
        spec = ContainerSpec(
            job_id="bench-direct",
            queue=QUEUE,
            worker_id="bench",
            attempt=1,
            image=IMAGE,
            command=["true"],
            inputs_dir=inputs,
            outputs_dir=outputs,
        )
        async with (
            Log(LogConfig(servers=(server.url,)), PeerKey.generate()) as client,
            Log(LogConfig(servers=(server.url,), echo=False), PeerKey.generate()) as wlog,
            DockerRuntime() as runtime,
        ):
            blobs = ObjectStoreBlobs(wlog.js)
            await blobs.ensure()
            worker = Worker(
                wlog,
                blobs,
                runtime,
                WorkerConfig(
                    queues=(QUEUE,),
                    data_dir=work / "worker",
                    slots=1,
                    heartbeat_s=30.0,
                ),
            )
            stop = asyncio.Event()
            task = asyncio.create_task(worker.run(stop))
            finished: dict[str, float] = {}
            arrived = asyncio.Event()

            async def on_event(msg: Msg) -> None:
                now = time.perf_counter()
                try:
                    opened = wire.open_envelope(msg.data, msg.subject)
                except EnvelopeError:
                    return
                if opened.event.get("type") == "finished":
                    finished.setdefault(msg.subject, now)
                    arrived.set()

            sub = await client.nc.subscribe(subjects.jobs_filter(QUEUE), cb=on_event)
            try:
                await asyncio.sleep(0.5)
                for i in range(n + 2):  # the first 2 warm up
                    t = time.perf_counter()
                    done = await jobs.submit(
                        client, QUEUE, {"image": IMAGE, "command": ["true", str(i)]}
                    )
                    subject = subjects.job_subject(QUEUE, done.job_id)
                    async with asyncio.timeout(60):
                        while subject not in finished:
                            arrived.clear()
                            await arrived.wait()
                    took_asman = finished[subject] - t
                    t = time.perf_counter()
                    code = await asyncio.to_thread(_direct_run, api, spec)
                    took_direct = time.perf_counter() - t
                    if code != 0:
                        raise RuntimeError(f"direct run exited {code}")
                    if i >= 2:
                        asman_s.append(took_asman * 1000)
                        direct_s.append(took_direct * 1000)
                state = await jobs.read_job(client, QUEUE, done.job_id)
                assert state is not None and state.reason == "success", state
            finally:
                await sub.unsubscribe()
                stop.set()
                await task
    ratios = [a / d for a, d in zip(asman_s, direct_s, strict=True)]
    log(f"container: asman p50 {median(asman_s):.0f} ms, direct p50 {median(direct_s):.0f} ms")
    return {
        "n_jobs": n,
        "asman_ms": {"p50": median(asman_s), "p90": percentile(asman_s, 90)},
        "direct_sdk_ms": {"p50": median(direct_s), "p90": percentile(direct_s, 90)},
        "container_ratio": median(asman_s) / median(direct_s),
        "container_ratio_median_of_pairs": median(ratios),
    }


def render(r: dict[str, Any]) -> str:
    return table(
        f"Container path, {r['n_jobs']} `true` jobs one at a time (ms)",
        ["what", "p50", "p90"],
        [
            ["Asman: submit → finished visible", r["asman_ms"]["p50"], r["asman_ms"]["p90"]],
            ["docker SDK: create/start/wait/remove", r["direct_sdk_ms"]["p50"],
             r["direct_sdk_ms"]["p90"]],
            ["ratio (median Asman / median direct)", r["container_ratio"], "-"],
        ],
    )  # fmt: skip
