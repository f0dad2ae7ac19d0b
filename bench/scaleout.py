"""Scale-out: jobs/s and claim latency with 1, 4 and 16 worker processes, on a 3-node cluster
(deploy/nats/cluster, streams at 3 replicas) and on a single node (deploy/nats/single), in the
same run (issue 6 section 4).

No containers: each worker process runs Asman's lease protocol itself, one job at a time,
through ``asman.log`` (take a waiting job from the queue's index, signed ``claimed`` by CAS
while the job is read and verified, ``started``, ``finished`` by CAS). That is everything a
worker does on the log for a job;
the container is left out so the figures show the log, not Docker. Nothing is faked: every
event is signed, verified and compare-and-set on real servers.

Per topology and process count: N jobs are submitted first (not timed), the worker processes
connect and wait, then all start at once. jobs/s = N / (last finish - start). Claim latency =
taking a job from the index -> claim accepted (read + verify + CAS append), per job;
"job" = the same start -> finished accepted. Every job must end finished exactly once
(checked after each run).

    .venv/bin/python -m bench.scaleout [--jobs 400] [--procs 1,4,16] [--repeat 3]
                                       [--reads direct|consumer] [--json]

``--reads consumer`` measures the confined read path (deploy/nats/accounts). The machine is
shared and small (2 cores): 16 processes oversubscribe it, which is the point (where does it
stop scaling). Servers bind 127.0.0.1 and are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.server import NatsServer, free_port, nats_server_binary
from bench.claiming import Claimer
from bench.common import ROOT, log, median, percentile, table

sys.path.insert(0, str(ROOT / "tests" / "federation"))  # the deploy/nats launcher of the tests
from topology import Topology

IMAGE = "asman/busybox:local"  # never run: the workers finish jobs without a container
SUBMIT_CONCURRENCY = 32


@contextmanager
def single_node(work: Path) -> Iterator[tuple[str, ...]]:
    """deploy/nats/single/open.conf (the single node without auth) on loopback."""
    topo = Topology(work, "single", ["open"], clustered=False)
    node = topo.nodes["open"]
    replace = {
        "0.0.0.0:4222": f"127.0.0.1:{node.client}",
        "127.0.0.1:8222": f"127.0.0.1:{node.http}",
        '"/var/lib/asman/nats"': json.dumps(str(work / "nats")),
    }
    node.server = NatsServer(
        work / "nats", port=node.client, http_port=node.http, config=topo.config(node, replace)
    )
    topo.start()
    try:
        yield (node.url,)
    finally:
        topo.stop()


@contextmanager
def cluster(work: Path) -> Iterator[tuple[str, ...]]:
    """deploy/nats/cluster/nats-{1,2,3}.conf on loopback."""
    topo = Topology(work, "cluster", ["nats-1", "nats-2", "nats-3"])
    topo.start()
    try:
        yield topo.urls()
    finally:
        topo.stop()


def _machine() -> dict[str, Any]:
    version = subprocess.run(
        [nats_server_binary(), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    return {
        "cores": os.cpu_count(),
        "nats_server": version.replace("nats-server:", "").strip(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- one worker process ----------------------------------------------------------------


async def worker_main(servers: list[str], queue: str, replicas: int, reads: str) -> None:
    """Print "ready", wait for "go" on stdin, drain the queue, print the stats as JSON."""
    config = LogConfig(servers=tuple(servers), replicas=replicas, manage_streams=False, reads=reads)
    async with Log(config, PeerKey.generate()) as lg:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        claimer = await Claimer(lg, queue).open()
        claim_ms: list[float] = []
        job_ms: list[float] = []
        last_finish = time.time()
        try:
            while True:
                t0 = time.perf_counter()
                lease = await claimer.next(1.0)
                t1 = time.perf_counter()
                if lease is None:
                    break  # everything was submitted before "go": the queue is drained
                await lease.start()
                await lease.finish({"reason": "success", "exit_code": 0, "duration_ms": 0})
                t2 = time.perf_counter()
                claim_ms.append((t1 - t0) * 1000)
                job_ms.append((t2 - t0) * 1000)
                last_finish = time.time()
        finally:
            await claimer.close()
    print(json.dumps({"claim_ms": claim_ms, "job_ms": job_ms, "last_finish": last_finish}))


# -- the run ---------------------------------------------------------------------------


async def _submit(servers: tuple[str, ...], replicas: int, queue: str, n: int) -> list[str]:
    config = LogConfig(servers=servers, replicas=replicas)
    async with Log(config, PeerKey.generate()) as lg:
        sem = asyncio.Semaphore(SUBMIT_CONCURRENCY)

        async def one(i: int) -> str:
            async with sem:
                definition = {"image": IMAGE, "command": f"true {queue} {i}"}
                return (await jobs.submit(lg, queue, definition)).job_id

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _verify(servers: tuple[str, ...], queue: str, ids: list[str]) -> int:
    """Number of jobs not finished exactly once (must be 0)."""
    config = LogConfig(servers=servers, manage_streams=False)
    async with Log(config, PeerKey.generate()) as lg:
        states = {s.job_id: s for s in await jobs.list_jobs(lg, queue)}
    bad = 0
    for i in ids:
        s = states.get(i)
        finished = sum(1 for h in s.history if h.type == "finished" and h.accepted) if s else 0
        bad += int(s is None or not s.finished or finished != 1)
    return bad


def one_run(
    servers: tuple[str, ...], replicas: int, procs: int, n: int, reads: str, queue: str
) -> dict[str, Any]:
    ids = asyncio.run(_submit(servers, replicas, queue, n))
    argv = [
        sys.executable,
        "-m",
        "bench.scaleout",
        "--worker",
        "--servers",
        ",".join(servers),
        "--queue",
        queue,
        "--replicas",
        str(replicas),
        "--reads",
        reads,
    ]
    workers = [
        subprocess.Popen(
            argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
        )
        for _ in range(procs)
    ]
    try:
        for w in workers:
            assert w.stdout is not None
            line = w.stdout.readline().strip()
            if line != "ready":
                raise RuntimeError(f"worker {w.pid} did not start (exit {w.wait()}): {line!r}")
        start = time.time()
        for w in workers:
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        outs = [w.communicate(timeout=600)[0] for w in workers]
    finally:
        for w in workers:  # by PID, only if still running
            if w.poll() is None:
                w.kill()
                w.wait()
    failed = [w.pid for w in workers if w.returncode != 0]
    if failed:
        raise RuntimeError(f"worker process(es) {failed} failed: see their stderr above")
    stats = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    claim_ms = [x for s in stats for x in s["claim_ms"]]
    job_ms = [x for s in stats for x in s["job_ms"]]
    wall = max(s["last_finish"] for s in stats) - start
    return {
        "procs": procs,
        "jobs": len(job_ms),
        "seconds": wall,
        "jobs_per_s": len(job_ms) / wall if wall > 0 else float("nan"),
        "claim_ms_p50": median(claim_ms),
        "claim_ms_p95": percentile(claim_ms, 95),
        "claim_ms_p99": percentile(claim_ms, 99),
        "job_ms_p50": median(job_ms),
        "not_exactly_once": asyncio.run(_verify(servers, queue, ids)),
    }


def run(
    n: int = 400, procs: tuple[int, ...] = (1, 4, 16), reads: str = "direct", repeat: int = 3
) -> dict[str, Any]:
    results: dict[str, Any] = {
        "n_jobs": n,
        "reads": reads,
        "repeat": repeat,
        "machine": _machine(),
        "rows": [],
    }
    topologies = (("single node, R1", single_node, 1), ("3-node cluster, R3", cluster, 3))
    for name, start, replicas in topologies:
        with (
            tempfile.TemporaryDirectory(prefix="asman-bench-scaleout-") as tmp,
            start(Path(tmp)) as servers,
        ):
            for p in procs:
                runs = []
                for rep in range(repeat):
                    queue = f"scale{replicas}x{p}r{rep}-{free_port()}"
                    runs.append(one_run(servers, replicas, p, n, reads, queue))
                    log(
                        f"{name}, {p} worker process(es), run {rep + 1}/{repeat}: "
                        f"{runs[-1]['jobs_per_s']:.0f} jobs/s, "
                        f"claim p50 {runs[-1]['claim_ms_p50']:.1f} ms"
                    )
                runs.sort(key=lambda x: x["jobs_per_s"])
                row = dict(runs[len(runs) // 2])  # the median run by jobs/s
                row["topology"] = name
                row["jobs_per_s_runs"] = [x["jobs_per_s"] for x in runs]
                row["not_exactly_once"] = sum(x["not_exactly_once"] for x in runs)
                results["rows"].append(row)
    return results


def render(r: dict[str, Any]) -> str:
    rows = [
        [
            x["topology"],
            x["procs"],
            x["jobs"],
            x["jobs_per_s"],
            x["claim_ms_p50"],
            x["claim_ms_p95"],
            x["claim_ms_p99"],
            x["job_ms_p50"],
            x["not_exactly_once"],
        ]
        for x in r["rows"]
    ]
    m = r["machine"]
    return table(
        f"Scale-out: {r['n_jobs']} jobs per run, median of {r['repeat']} runs, lease protocol "
        f"without containers, reads={r['reads']} ({m['cores']} cores, "
        f"nats-server {m['nats_server']}, load {m['load_avg_at_start'][0]})",
        [
            "topology",
            "worker procs",
            "jobs",
            "jobs/s",
            "claim p50 ms",
            "claim p95 ms",
            "claim p99 ms",
            "job p50 ms",
            "not exactly once",
        ],
        rows,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--procs", default="1,4,16")
    parser.add_argument("--reads", choices=["direct", "consumer"], default="direct")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--servers", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--replicas", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        asyncio.run(worker_main(args.servers.split(","), args.queue, args.replicas, args.reads))
        return 0
    procs = tuple(int(p) for p in args.procs.split(","))
    results = run(args.jobs, procs, args.reads, args.repeat)
    print(json.dumps(results, indent=2) if args.json else render(results))
    bad = sum(x["not_exactly_once"] for x in results["rows"])
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
