"""One worker process for the scale benchmark (benchmark-only: it runs the ``NoopRuntime``).

``python -m bench.worker_proc --url URL --queue Q --data-dir DIR [--jobs K] [--slots N]``
prints one JSON line ``{"ready": true}`` once it runs, and at the end one JSON line with
the jobs it ran, its claim latencies (ms, from calling ``claim`` to holding the lease), its
resident memory (``VmRSS`` and peak ``VmHWM``, KiB) and its peer id. It stops after ``K`` jobs,
or on SIGTERM (the parent stops it by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

from asman.log import leases
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.leases import JobLease
from asman.log.objstore import ObjectStoreBlobs
from asman.peer import worker as worker_module
from asman.peer.worker import Worker, WorkerConfig
from bench.noop import NoopRuntime


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def main(args: argparse.Namespace) -> dict[str, Any]:
    claim_ms: list[float] = []
    claimed_at: list[float] = []
    missed = 0  # claims that found the job taken (by another worker, first)
    real_claim = leases.claim

    async def timed_claim(
        log: Log, queue: str, job: str, *args: Any, **kwargs: Any
    ) -> JobLease | None:
        nonlocal missed
        t = time.perf_counter()
        lease = await real_claim(log, queue, job, *args, **kwargs)
        if lease is not None:
            claimed_at.append(time.perf_counter())
            claim_ms.append((claimed_at[-1] - t) * 1000)
        else:
            missed += 1
        return lease

    # benchmark instrumentation of this process only: time each claim
    setattr(worker_module, "claim", timed_claim)  # noqa: B010 - the worker's own import
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with Log(LogConfig(servers=(args.url,), echo=False), PeerKey.generate()) as log:
        blobs = ObjectStoreBlobs(log.js)
        await blobs.ensure()
        runtime = NoopRuntime()
        worker = Worker(
            log,
            blobs,
            runtime,
            WorkerConfig(
                queues=(args.queue,),
                data_dir=Path(args.data_dir),
                slots=args.slots,
                heartbeat_s=5.0,
                drain_grace_s=5.0,
                sweep_interval_s=3600.0,
            ),
        )
        task = asyncio.create_task(worker.run(stop))
        print(json.dumps({"ready": True}), flush=True)
        t0 = time.perf_counter()
        while not stop.is_set():
            if args.jobs and worker.jobs_done >= args.jobs:
                break
            if task.done():
                task.result()
                break
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
        # steady rate: from the 10th claim on (the first ones include the worker's start)
        steady = claimed_at[10:]
        return {
            "first_claim_s": claimed_at[0] - t0 if claimed_at else None,
            "steady_jobs_per_s": (len(steady) - 1) / (steady[-1] - steady[0])
            if len(steady) > 1
            else None,
            "peer": log.peer_id,
            "runs": runtime.runs,
            "jobs_done": worker.jobs_done,
            "elapsed_s": elapsed,
            "claim_ms": claim_ms,
            "claims_missed": missed,
            "rss_kb": _status("VmRSS"),
            "hwm_kb": _status("VmHWM"),
        }


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--slots", type=int, default=1)
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result), flush=True)
    sys.exit(0)
