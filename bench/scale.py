"""Scale: a deep queue must not cost the worker memory or claim latency; 16 workers on one
queue never claim a job twice.

1. Flat with depth: ``deep`` jobs are queued on one queue and 100 on another. A fresh worker
   process (``bench.worker_proc``, 1 slot, no-op runtime) takes 100 jobs from each; we compare
   its resident memory and its claim latency (``claim`` call to lease held).
2. Contention: 16 worker processes (1 slot each) wait on one queue; ``contended`` jobs are
   submitted; when the queue is drained every job must be finished once, with exactly one
   accepted claim, and the workers together must have run each job exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.leases import WaitingIndex
from bench.common import ROOT, log, median, nats_server, percentile, rss_kb, scratch, table

IMAGE = "asman/busybox:local"
TAKE = 100


async def _enqueue(client: Log, queue: str, n: int, concurrency: int = 128) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await jobs.submit(client, queue, {"image": IMAGE, "command": ["true", queue, str(i)]})

    t = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    return n / (time.perf_counter() - t)


def _spawn(url: str, queue: str, data_dir: Path, take: int = 0) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "bench.worker_proc", "--url", url, "--queue", queue]
    argv += ["--data-dir", str(data_dir)]
    if take:
        argv += ["--jobs", str(take)]
    return subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL
    )


async def _result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    assert proc.stdout is not None

    def read() -> dict[str, Any]:
        assert proc.stdout is not None
        last: dict[str, Any] = {}
        for line in proc.stdout:
            obj = json.loads(line)
            if "runs" in obj:
                last = obj
        proc.wait()
        return last

    try:
        return await asyncio.wait_for(asyncio.to_thread(read), timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)
    if not json.loads(line).get("ready"):
        raise RuntimeError(f"worker process said {line!r}")


async def _take(url: str, queue: str, work: Path) -> dict[str, Any]:
    proc = _spawn(url, queue, work / f"w-{queue}", TAKE)
    await _ready(proc)
    out = await _result(proc, 300)
    if out.get("jobs_done", 0) < TAKE:
        raise RuntimeError(f"worker on {queue} did {out.get('jobs_done')} jobs")
    return out


async def _contention(client: Log, url: str, n: int, workers: int, work: Path) -> dict[str, Any]:
    queue = "scale-16"
    procs = [_spawn(url, queue, work / f"c{i}") for i in range(workers)]
    try:
        for proc in procs:
            await _ready(proc)
        t = time.perf_counter()
        await _enqueue(client, queue, n, concurrency=32)
        index = WaitingIndex(client, queue, asyncio.Event())
        async with asyncio.timeout(600):
            while True:  # a cheap poll: the queue's index holds no unfinished job
                await index.scan()
                if not index.entries:
                    break
                await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
    results = [await _result(proc, 120) for proc in procs]
    states = await jobs.list_jobs(client, queue)
    runs = sum(r.get("runs", 0) for r in results)
    twice = [
        s.job_id
        for s in states
        if s.claims != 1
        or sum(1 for h in s.history if h.type == "claimed" and h.accepted) != 1
        or s.reason != "success"
    ]
    return {
        "workers": workers,
        "jobs": n,
        "jobs_seen": len(states),
        "runs_total": runs,
        "claims_missed": sum(r.get("claims_missed", 0) for r in results),
        "jobs_claimed_more_than_once": len(twice),
        "claims_per_s": n / elapsed,
        "busiest_worker_runs": max(r.get("runs", 0) for r in results),
        "idlest_worker_runs": min(r.get("runs", 0) for r in results),
        "ok": len(states) == n and runs == n and not twice,
    }


async def run(deep: int = 20_000, contended: int = 2000, workers: int = 16) -> dict[str, Any]:
    with nats_server("scale") as server, scratch("scale", fast=True) as work:
        async with Log(LogConfig(servers=(server.url,)), PeerKey.generate()) as client:
            rate = await _enqueue(client, "scale-deep", deep)
            log(f"scale: {deep:,} jobs queued at {rate:,.0f} jobs/s")
            await _enqueue(client, "scale-shallow", TAKE)
            shallow = await _take(server.url, "scale-shallow", work)
            deep_r = await _take(server.url, "scale-deep", work)
            log("scale: depth runs done; contention next")
            contention = await _contention(client, server.url, contended, workers, work)
            server_rss = rss_kb(server.pid)
    out: dict[str, Any] = {
        "deep_jobs_queued": deep,
        "deep_enqueue_jobs_per_s": rate,
        "jobs_taken_per_run": TAKE,
        "shallow": _summary(shallow),
        "deep": _summary(deep_r),
        "nats_server_rss_mib_after": round(server_rss / 1024, 1),
        "contention": contention,
    }
    out["memory_deep_vs_shallow_ratio"] = out["deep"]["rss_mib"] / out["shallow"]["rss_mib"]
    out["claim_p50_deep_vs_shallow_ratio"] = (
        out["deep"]["claim_p50_ms"] / out["shallow"]["claim_p50_ms"]
    )
    return out


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    claims = r["claim_ms"]
    return {
        "rss_mib": round(r["rss_kb"] / 1024, 1),
        "peak_rss_mib": round(r["hwm_kb"] / 1024, 1),
        "claim_p50_ms": median(claims),
        "claim_p99_ms": percentile(claims, 99),
        "jobs_per_s": r["steady_jobs_per_s"],
        "first_claim_s": r["first_claim_s"],
    }


def render(r: dict[str, Any]) -> str:
    s, d, c = r["shallow"], r["deep"], r["contention"]
    first = table(
        f"Scale: one worker takes {r['jobs_taken_per_run']} jobs from a queue {TAKE} deep and "
        f"{r['deep_jobs_queued']:,} deep",
        ["queue depth", "worker RSS MiB", "peak RSS MiB", "claim p50 ms", "claim p99 ms",
         "jobs/s (steady)", "first claim s"],
        [
            [TAKE, s["rss_mib"], s["peak_rss_mib"], s["claim_p50_ms"], s["claim_p99_ms"],
             s["jobs_per_s"], s["first_claim_s"]],
            [r["deep_jobs_queued"], d["rss_mib"], d["peak_rss_mib"], d["claim_p50_ms"],
             d["claim_p99_ms"], d["jobs_per_s"], d["first_claim_s"]],
            ["ratio deep/shallow", r["memory_deep_vs_shallow_ratio"], "-",
             r["claim_p50_deep_vs_shallow_ratio"], "-", "-", "-"],
        ],
    )  # fmt: skip
    second = table(
        f"Scale: {c['workers']} worker processes on one queue, {c['jobs']:,} jobs",
        ["claims/s", "jobs finished", "runs (all workers)", "claimed twice", "runs per worker"],
        [[c["claims_per_s"], c["jobs_seen"], c["runs_total"], c["jobs_claimed_more_than_once"],
          f"{c['idlest_worker_runs']}-{c['busiest_worker_runs']}"]],
    )  # fmt: skip
    return first + "\n\n" + second
