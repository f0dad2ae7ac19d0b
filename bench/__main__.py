"""``python -m bench`` (``make bench``): every benchmark of issue 7, each next to its baseline.

Runs, in order: queue path, ``--procs 2`` next to one process, latency, container path,
blobs (50 MiB x3, 500 MiB x1), scale, many queues (100,000 on one server, 10,000 on an R3
cluster), gateway, TES next to Asman's own API. Each prints its table; each writes
``bench/results/<name>.json``; at the end
``bench/results/latest.json`` holds the headline figures, the machine and every result, and
``bench/results/latest.md`` the tables (only a run of every benchmark replaces them). Sizes
are chosen so the whole run takes under 10 minutes on a 2-core box; ``--quick`` shrinks them
for a smoke test and writes to ``bench/results/quick/``.

    python -m bench [--only queue,latency,...] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from bench import blobs, container, gateway, latency, procs, queue_path, queues, scale, tes
from bench.common import RESULTS, log, machine

NAMES = ("queue", "procs", "latency", "container", "blobs", "scale", "queues", "gateway", "tes")

FULL = {
    "queue": {"n": 2000, "repeat": 3},
    "procs": {"n": 4000, "repeat": 3},
    "latency": {"n": 300},
    "container": {"n": 30},
    "blobs": {"small_mb": 50, "repeat": 3, "large_mb": 500},
    "scale": {"deep": 100_000, "contended": 2000, "workers": 16},
    "queues": {"queues": 100_000, "cluster_queues": 10_000, "idle_s": 10.0, "probe": 200},
    "gateway": {"n_submit": 1000, "n_read": 2000, "watchers": 500},
    "tes": {"n": 20},
}
QUICK = {
    "queue": {"n": 300, "repeat": 1},
    "procs": {"n": 500, "repeat": 1},
    "latency": {"n": 50},
    "container": {"n": 5},
    "blobs": {"small_mb": 8, "repeat": 1, "large_mb": 0},
    "scale": {"deep": 2000, "contended": 200, "workers": 4},
    "queues": {"queues": 2000, "cluster_queues": 500, "idle_s": 2.0, "probe": 30},
    "gateway": {"n_submit": 100, "n_read": 200, "watchers": 50},
    "tes": {"n": 4},
}


async def _blobs(small_mb: int, repeat: int, large_mb: int) -> dict[str, Any]:
    rows = await blobs.run(small_mb, repeat)
    out: dict[str, Any] = {
        "small_mb": small_mb,
        "repeat": repeat,
        "small": [asdict(r) for r in rows],
    }
    text = [_fenced(blobs.render(rows, small_mb, repeat))]
    if large_mb:
        large = await blobs.run(large_mb, 1, memory_get=False)
        out["large_mb"] = large_mb
        out["large"] = [asdict(r) for r in large]
        text.append(_fenced(blobs.render(large, large_mb, 1)))

    def pick(rows: list[dict[str, Any]], store: str, op: str, impl: str) -> float:
        for r in rows:
            if r["store"] == store and r["op"] == op and r["impl"].startswith(impl):
                return float(r["mib_s_median"])
        return float("nan")

    small = out["small"]
    out["objstore_get_mib_s"] = pick(small, "objstore", "get", "ours")
    out["objstore_get_raw_writeinto_mib_s"] = pick(small, "objstore", "get", "nats-py obs.get(w")
    out["s3_get_ratio"] = pick(small, "s3", "get", "ours") / pick(small, "s3", "get", "minio")
    out["s3_put_ratio"] = pick(small, "s3", "put", "ours (sha256") / pick(
        small, "s3", "put", "minio"
    )
    if large_mb:
        big = out["large"]
        out["objstore_get_mib_s_large"] = pick(big, "objstore", "get", "ours")
        out["s3_get_ratio_large"] = pick(big, "s3", "get", "ours") / pick(big, "s3", "get", "minio")
        out["s3_put_ratio_large"] = pick(big, "s3", "put", "ours (sha256") / pick(
            big, "s3", "put", "minio"
        )
    out["_text"] = "\n\n".join(text)
    return out


def _fenced(text: str) -> str:
    """bench/blobs.py renders plain text: a Markdown heading and a code block around it."""
    title, _, body = text.partition("\n")
    return f"### Blob stores: {title.removeprefix('blob stores, ')}\n\n```\n{body}\n```"


def _runner(name: str, p: dict[str, Any]) -> tuple[Callable[[], Awaitable[Any]], Any]:
    if name == "queue":
        return lambda: queue_path.run(p["n"], p["repeat"]), queue_path.render
    if name == "procs":
        return lambda: procs.run(p["n"], p["repeat"]), procs.render
    if name == "latency":
        return lambda: latency.run(p["n"]), latency.render
    if name == "container":
        return lambda: container.run(p["n"]), container.render
    if name == "blobs":
        return lambda: _blobs(p["small_mb"], p["repeat"], p["large_mb"]), lambda r: r.pop("_text")
    if name == "scale":
        return lambda: scale.run(p["deep"], p["contended"], p["workers"]), scale.render
    if name == "queues":
        return (
            lambda: queues.run(p["queues"], p["cluster_queues"], p["idle_s"], p["probe"]),
            queues.render,
        )
    if name == "gateway":
        return lambda: gateway.run(p["n_submit"], p["n_read"], p["watchers"]), gateway.render
    if name == "tes":
        return lambda: tes.run(p["n"]), tes.render
    raise ValueError(name)


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The figures issue 7 names, each next to its baseline."""
    out: dict[str, Any] = {}
    q = results.get("queue")
    if q:
        out.update(
            queue_drain_jobs_per_s=q["queue_drain_jobs_per_s"],
            queue_drain_1slot_jobs_per_s=q["queue_drain_1slot_jobs_per_s"],
            raw_fetch1_jobs_per_s=q["raw_fetch1_jobs_per_s"],
            raw_fetch1_10_inflight_jobs_per_s=q["raw_fetch1_10_inflight_jobs_per_s"],
            queue_drain_vs_raw_fetch1=q["drain_vs_raw_fetch1"],
            enqueue_jobs_per_s=q["enqueue_jobs_per_s"],
            raw_enqueue_jobs_per_s=q["raw_enqueue_jobs_per_s"],
        )
    pr = results.get("procs")
    if pr:
        out.update(
            drain_1proc_jobs_per_s=pr["drain_1proc_jobs_per_s"],
            drain_2procs_jobs_per_s=pr["drain_2procs_jobs_per_s"],
            drain_procs2_vs_1_ratio=pr["procs2_vs_1_ratio"],
        )
    lat = results.get("latency")
    if lat:
        out.update(
            submit_started_p50_ms=lat["submit_started_p50_ms"],
            submit_started_p99_ms=lat["submit_started_p99_ms"],
            submit_result_visible_p50_ms=lat["submit_result_visible_ms"]["p50"],
            raw_request_reply_p50_ms=lat["raw_request_reply_p50_ms"],
        )
    c = results.get("container")
    if c:
        out.update(
            container_ratio=c["container_ratio"],
            container_asman_p50_ms=c["asman_ms"]["p50"],
            container_direct_sdk_p50_ms=c["direct_sdk_ms"]["p50"],
        )
    b = results.get("blobs")
    if b:
        out.update(
            objstore_get_mib_s=b["objstore_get_mib_s"],
            objstore_get_raw_writeinto_mib_s=b["objstore_get_raw_writeinto_mib_s"],
            s3_get_ratio=b["s3_get_ratio"],
            s3_put_ratio=b["s3_put_ratio"],
        )
    s = results.get("scale")
    if s:
        out.update(
            memory_100k_vs_100_ratio=s["memory_deep_vs_shallow_ratio"],
            claim_latency_100k_vs_100_ratio=s["claim_p50_deep_vs_shallow_ratio"],
            scale_deep_jobs_queued=s["deep_jobs_queued"],
            contention_claims_per_s=s["contention"]["claims_per_s"],
            contention_jobs_claimed_twice=s["contention"]["jobs_claimed_more_than_once"],
        )
    mq = results.get("queues")
    if mq:
        single = mq["single"]
        out.update(
            many_queues=single["queues"],
            many_queues_probe_latency_ratio=single["probe_latency_ratio"],
            many_queues_memory_per_queue_bytes=single["memory_per_queue_bytes"],
            many_queues_idle_cpu_empty_full=single["idle_cpu_full_vs_empty"],
            many_queues_consumers=single["consumers"],
        )
        if "cluster" in mq:
            r3 = mq["cluster"]
            out.update(
                many_queues_r3=r3["queues"],
                many_queues_r3_probe_latency_ratio=r3["probe_latency_ratio"],
                many_queues_r3_memory_per_queue_bytes=r3["memory_per_queue_bytes"],
                many_queues_r3_jobs_waiting_after_restart=r3["jobs_waiting_after"],
            )
    g = results.get("gateway")
    if g:
        out.update(
            gateway_submit_rps=g["submit_rps"],
            gateway_read_rps=g["read_rps"],
            gateway_sse_watchers=g["sse"]["watchers"],
            gateway_sse_delivered=g["sse"]["delivered"],
            gateway_sse_p99_ms=g["sse"]["delivery_ms"]["p99"],
        )
    t = results.get("tes")
    if t:
        out.update(
            tes_ratio=t["tes_ratio"],
            tes_p50_ms=t["tes_ms"]["p50"],
            tes_asman_api_p50_ms=t["asman_api_ms"]["p50"],
        )
    return out


async def main(names: list[str], quick: bool) -> int:
    params = QUICK if quick else FULL
    out_dir = RESULTS / "quick" if quick else RESULTS  # a smoke run never replaces figures
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    info = machine()
    log(f"machine: {info}")
    results: dict[str, Any] = {}
    tables: list[str] = []
    failed: list[str] = []
    for name in names:
        t = time.perf_counter()
        log(f"{name}: starting {params[name]}")
        run, render = _runner(name, params[name])
        try:
            result = await run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        result["params"] = params[name]
        result["seconds"] = round(time.perf_counter() - t, 1)
        text = render(result)
        print(text + "\n", flush=True)
        tables.append(text)
        results[name] = result
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        log(f"{name}: done in {result['seconds']} s")
    latest = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "total_seconds": round(time.time() - started, 1),
        "quick": quick,
        "machine": info,
        **headline(results),
        "failed": failed,
        "results": results,
    }
    if set(names) == set(NAMES) or not (out_dir / "latest.json").exists():
        (out_dir / "latest.json").write_text(json.dumps(latest, indent=2, default=str) + "\n")
        (out_dir / "latest.md").write_text(_markdown(latest, tables))
    log(f"all done in {latest['total_seconds']} s; failed: {failed or 'none'}")
    return 1 if failed else 0


def _markdown(latest: dict[str, Any], tables: list[str]) -> str:
    m = latest["machine"]
    head = (
        f"Run {latest['when']}, {latest['total_seconds']} s. Machine: {m['cpu_model']}, "
        f"{m['cores']} cores, {m['memory_gib']} GiB, {m['implementation']} {m['python']}, "
        f"nats-server {m['nats_server']}, nats-py {m['nats_py']}, Docker {m['docker']}, "
        f"load average at start {m['load_avg_at_start']}."
    )
    return head + "\n\n" + "\n\n".join(tables) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Asman benchmarks (issue 7)")
    parser.add_argument("--only", default=",".join(NAMES), help="comma-separated subset")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    args = parser.parse_args()
    chosen = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(chosen) - set(NAMES)
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {NAMES}")
    sys.exit(asyncio.run(main(chosen, args.quick)))
