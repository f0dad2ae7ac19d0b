"""Jobs through the gateway end to end: real gateway, nats-server, worker and Docker engine."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import itertools
import os
from typing import Any

import pytest
from gatewaystack import IMAGE, Gateway, Stack, on_the_log, replace_limits
from sseparse import read_events
from yarl import URL

from asman.log import jobs, subjects

pytestmark = [pytest.mark.docker]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def gw(stack: Stack, busybox_image: str) -> Gateway:
    return await stack.gateway()


async def put_blob(gw: Gateway, data: bytes) -> str:
    digest = sha(data)
    status, body = await gw.json("PUT", f"/f/{digest}", data=io.BytesIO(data))
    assert status == 200, body
    return digest


async def get_bytes(gw: Gateway, path: str) -> tuple[int, bytes, dict[str, str]]:
    async with gw.http.get(path) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def test_submit_run_and_fetch_outputs_byte_exact(stack: Stack, gw: Gateway) -> None:
    await stack.worker("run")
    big = os.urandom(6 * 1024 * 1024 + 11)
    digest = await put_blob(gw, big)
    raw = bytes(range(256))
    definition = {
        "image": IMAGE,
        "command": "sh -c 'echo start; echo oops >&2; mkdir -p /outputs/a/b; "
        "cat /inputs/note.txt > /outputs/a/b/c.txt; cp /inputs/data/big.bin /outputs/big.bin; "
        "cp /inputs/raw.bin /outputs/raw.bin; echo done'",
        "inputs": {
            "note.txt": {"type": "utf8", "value": "hello gateway\n"},
            "data/big.bin": {"type": "blob", "value": digest},
            "raw.bin": {"type": "base64", "value": base64.b64encode(raw).decode()},
        },
    }
    status, body = await gw.json("POST", "/api/v1/queues/run/jobs", json={"definition": definition})
    assert status == 201, body
    jid = body["jobId"]
    job = await gw.wait_job("run", jid)
    assert job["reason"] == "success", job
    result = job["result"]
    assert result["exitCode"] == 0 and result["durationMs"] is not None
    assert {o["path"] for o in result["outputs"]} == {"a/b/c.txt", "big.bin", "raw.bin"}

    expected = {"a/b/c.txt": b"hello gateway\n", "big.bin": big, "raw.bin": raw}
    for prefix in (f"/api/v1/queues/run/jobs/{jid}", f"/q/run/j/{jid}", f"/j/{jid}"):
        for path, data in expected.items():
            url = f"{prefix}/outputs/{path}" + ("?queue=run" if prefix.startswith("/j/") else "")
            status, got, headers = await get_bytes(gw, url)
            assert status == 200, url
            assert got == data, url
            assert headers["Content-Security-Policy"].startswith("sandbox")
    status, got, headers = await get_bytes(gw, f"/q/run/j/{jid}/outputs/a/b/c.txt?download=1")
    assert headers["Content-Disposition"].startswith("attachment")
    # inputs by path: inline text, a blob, base64
    for path, data in (("note.txt", b"hello gateway\n"), ("data/big.bin", big), ("raw.bin", raw)):
        status, got, _ = await get_bytes(gw, f"/q/run/j/{jid}/inputs/{path}")
        assert (status, got) == (200, data), path
    for bad in ("nope.txt", "a/b"):
        status, body = await gw.json("GET", f"/q/run/j/{jid}/outputs/{bad}")
        assert status == 404 and body["code"] == "not_found"
    raw_url = URL(f"{gw.url}/q/run/j/{jid}/outputs/a/../big.bin", encoded=True)
    status, body = await gw.json("GET", raw_url)
    assert status == 400 and body["code"] == "invalid_path"

    # logs with a cursor
    status, logs = await gw.json("GET", f"/api/v1/queues/run/jobs/{jid}/logs")
    assert status == 200 and logs["final"] is True
    text = {
        s: "".join(c["text"] for c in logs["chunks"] if c["stream"] == s)
        for s in ("stdout", "stderr")
    }
    assert text == {"stdout": "start\ndone\n", "stderr": "oops\n"}
    status, rest = await gw.json(
        "GET", f"/api/v1/queues/run/jobs/{jid}/logs?cursor={logs['cursor']}"
    )
    assert rest["chunks"] == [] and rest["cursor"] == logs["cursor"]

    # compute-queues shapes
    status, res = await gw.json("GET", f"/q/run/j/{jid}/result.json")
    finished = res["data"]["finished"]
    assert res["data"]["state"] == "Finished" and res["data"]["finishedReason"] == "Success"
    cq = finished["result"]
    assert cq["StatusCode"] == 0 and cq["isTimedOut"] is False
    assert cq["outputs"]["a/b/c.txt"] == {
        "type": "base64",
        "value": base64.b64encode(b"hello gateway\n").decode(),
    }
    assert cq["outputs"]["big.bin"]["type"] == "url"
    assert cq["outputs"]["big.bin"]["value"] == f"{gw.url}/f/{sha(big)}"
    status, got, _ = await get_bytes(gw, cq["outputs"]["big.bin"]["value"].removeprefix(gw.url))
    assert got == big
    assert "".join(line[0] for line in cq["logs"] if len(line) == 2) == "start\ndone\n"
    assert [line for line in cq["logs"] if len(line) == 3] == [
        ["oops\n", pytest.approx(0, abs=10**14), True]
    ]
    status, got = await gw.json("GET", f"/j/{jid}/run-logs.json?queue=run")
    assert status == 200 and "".join(got["data"]) in (
        "start\noops\ndone\n",
        "start\ndone\noops\n",
        "oops\nstart\ndone\n",
    )
    assert got["isFinal"] is True


async def test_a_long_log_is_read_page_by_page(stack: Stack, busybox_image: str) -> None:
    """A log of several messages, read over HTTP with pages smaller than the log: ``more``
    while there is more, each page as many whole messages as fit, and the pages together
    are the whole log, in order."""
    budget = 128 * 1024
    gw = await stack.gateway(limits=replace_limits(max_log_response_bytes=budget))
    await stack.worker("pages")
    # eight bursts of ~58 KiB, apart in time: several log messages
    script = "for i in 0 1 2 3 4 5 6 7; do seq $((i*10000+1)) $((i*10000+10000)); sleep 0.2; done"
    definition = {"image": IMAGE, "command": ["sh", "-c", script + "; echo the end >&2"]}
    status, body = await gw.json(
        "POST", "/api/v1/queues/pages/jobs", json={"definition": definition}
    )
    assert status == 201, body
    jid = body["jobId"]
    job = await gw.wait_job("pages", jid)
    assert job["reason"] == "success", job

    pages: list[dict[str, Any]] = []
    cursor = 1
    while True:
        status, page = await gw.json("GET", f"/api/v1/queues/pages/jobs/{jid}/logs?cursor={cursor}")
        assert status == 200, page
        pages.append(page)
        assert page["final"] is not page["more"], page["cursor"]  # final only on the last
        if not page["more"]:
            break
        assert page["cursor"] > cursor and page["chunks"], page["cursor"]
        cursor = page["cursor"]
        assert len(pages) < 100, "the cursor does not move on"

    def messages(page: dict[str, Any]) -> list[int]:
        """The bytes of each log message of a page."""
        sizes: dict[int, int] = {}
        for c in page["chunks"]:
            sizes[c["seq"]] = sizes.get(c["seq"], 0) + len(c["text"].encode())
        return list(sizes.values())

    assert len(pages) >= 2, [messages(p) for p in pages]
    for page, following in itertools.pairwise(pages):
        # as many whole messages as fit: the next page's first one did not
        assert sum(messages(page)) + messages(following)[0] > budget, [messages(p) for p in pages]
    for page in pages:
        assert sum(messages(page)) <= budget or len(messages(page)) == 1
    chunks = [c for page in pages for c in page["chunks"]]
    seqs = [c["seq"] for c in chunks]
    assert seqs == sorted(seqs)  # in order, and no message twice across pages
    stdout = "".join(c["text"] for c in chunks if c["stream"] == "stdout")
    assert stdout == "".join(f"{i}\n" for i in range(1, 80_001))
    assert [c["text"] for c in chunks if c["stream"] == "stderr"] == ["the end\n"]
    # past the last page: nothing more, and final
    status, rest = await gw.json(
        "GET", f"/api/v1/queues/pages/jobs/{jid}/logs?cursor={pages[-1]['cursor']}"
    )
    assert (rest["chunks"], rest["more"], rest["final"]) == ([], False, True)


async def test_rerun_runs_a_result_again_and_only_for_its_submitter(
    stack: Stack, gw: Gateway
) -> None:
    await stack.worker("again")
    other = await stack.gateway()  # another gateway: another key, not the submitter
    url = "/api/v1/queues/again/jobs"
    definition = {
        "image": IMAGE,
        "command": "sh -c 'head -c 16 /dev/urandom | od -An -tx1 > /outputs/nonce'",
    }
    status, body = await gw.json("POST", url, json={"definition": definition})
    assert status == 201, body
    jid = body["jobId"]
    first = await gw.wait_job("again", jid)
    assert first["reason"] == "success", first
    (nonce,) = first["result"]["outputs"]

    def same_run(job: dict[str, Any]) -> None:
        assert job["state"] == "finished" and job["result"] == first["result"], job
        assert "requeued" not in [h["type"] for h in job.get("history", [])]

    # without rerun: the cached result, from either gateway
    for g in (gw, other):
        status, again = await g.json("POST", url, json={"definition": definition})
        assert (status, again["cached"], again["requeued"]) == (200, True, False), again
        same_run(again)
    # another peer may not force a re-run of a result
    status, refused = await other.json("POST", url, json={"definition": definition, "rerun": True})
    assert (status, refused["code"]) == (403, "forbidden"), refused
    assert "only the peer that submitted it" in refused["error"]
    same_run((await gw.json("GET", f"{url}/{jid}"))[1])

    # the submitter may: a new run, a new result
    status, rerun = await gw.json("POST", url, json={"definition": definition, "rerun": True})
    assert status == 200 and rerun["requeued"] is True and rerun["cached"] is False, rerun
    assert rerun["state"] in ("queued", "running"), rerun
    second = await gw.wait_job("again", jid)
    assert second["reason"] == "success", second
    assert second["result"]["finishedMs"] > first["result"]["finishedMs"]
    (new_nonce,) = second["result"]["outputs"]
    assert new_nonce["sha256"] != nonce["sha256"]
    status, got, _ = await get_bytes(gw, new_nonce["url"])
    assert status == 200 and hashlib.sha256(got).hexdigest() == new_nonce["sha256"]
    types = [h["type"] for h in second["history"] if h["accepted"]]
    assert types.count("requeued") == 1 and types.count("finished") == 2, types


async def test_resubmit_is_cached_and_compat_flow(stack: Stack, gw: Gateway) -> None:
    await stack.worker("cq")
    definition = {"image": IMAGE, "command": "sh -c 'echo cq; exit 3'"}
    status, body = await gw.json("POST", "/q/cq", json={"definition": definition})
    assert status == 200 and body["success"] is True
    jid = body["jobId"]
    await gw.wait_job("cq", jid)
    status, got = await gw.json("GET", f"/j/{jid}?queue=cq")
    assert status == 200, got
    results = got["data"]["results"]
    assert results["state"] == "Finished", results
    assert results["finishedReason"] == "Success"  # compute-queues: non-zero exit is Success
    assert results["finished"]["result"]["StatusCode"] == 3
    status, again = await gw.json("POST", "/q/cq", json={"definition": definition})
    assert again["jobId"] == jid and again["cached"] is True
    status, native = await gw.json("GET", f"/api/v1/queues/cq/jobs/{jid}")
    assert native["reason"] == "failed" and native["attempts"] == 1


async def test_waiting_reasons_with_a_real_worker(stack: Stack, gw: Gateway) -> None:
    """A 64 MiB worker never claims a job that asks for 1 GiB (it would run it with less
    than it asked for): the job waits, and the gateway says no worker has that memory."""
    worker = await stack.worker("small", memory_limit_bytes=64 * 1024 * 1024)
    async with asyncio.timeout(30):
        await worker.beaten.wait()  # its heartbeat is on the log
    status, online = await gw.json("GET", "/api/v1/queues/small/workers")
    assert status == 200 and [w["memoryBytes"] for w in online["workers"]] == [64 * 1024**2]
    big = {"image": IMAGE, "command": "true", "requirements": {"memory": "1g"}}
    status, body = await gw.json("POST", "/api/v1/queues/small/jobs", json={"definition": big})
    assert status == 201, body
    big_id = body["jobId"]
    # a job the worker can run, submitted after the big one: once it is done, the worker has
    # been through the queue (oldest first) and passed the big one by
    fits = {"image": IMAGE, "command": "true", "requirements": {"memory": "32m"}}
    status, body = await gw.json("POST", "/api/v1/queues/small/jobs", json={"definition": fits})
    assert status == 201, body
    done = await gw.wait_job("small", body["jobId"])
    assert done["reason"] == "success", done
    status, job = await gw.json("GET", f"/api/v1/queues/small/jobs/{big_id}")
    assert status == 200
    assert (job["state"], job["attempts"]) == ("queued", 0), job
    assert [h["type"] for h in job["history"]] == ["submitted"], job["history"]
    assert job["waiting"]["code"] == "no_worker_with_memory", job["waiting"]
    assert "1.0 GiB" in job["waiting"]["message"] and "64.0 MiB" in job["waiting"]["message"]

    # GPUs: no worker on the queue has any, so the worker takes the job only to refuse it
    # with the reason (docs/guide.md); until then it waits for a worker with GPUs
    gpus = {"image": IMAGE, "command": "true", "requirements": {"gpus": 2}}
    status, body = await gw.json("POST", "/api/v1/queues/small/jobs", json={"definition": gpus})
    assert status == 201, body
    status, job = await gw.json("GET", f"/api/v1/queues/small/jobs/{body['jobId']}")
    if job["state"] == "queued":
        assert job["waiting"]["code"] == "no_worker_with_gpus", job["waiting"]
    job = await gw.wait_job("small", body["jobId"])
    assert job["reason"] == "error" and "GPUs" in job["result"]["message"], job


async def test_a_job_that_fits_runs_behind_many_that_do_not(stack: Stack, gw: Gateway) -> None:
    """More jobs too big for the worker than its window of waiting jobs (256), then one it
    can run: it runs, and none of the big ones is claimed."""
    peer = await stack.peer()
    limit = asyncio.Semaphore(32)

    async def big(i: int) -> None:
        async with limit:
            definition = {"image": IMAGE, "command": f"echo {i}", "requirements": {"memory": "1g"}}
            await jobs.submit(peer, "deep", definition)

    await asyncio.gather(*(big(i) for i in range(300)))
    fits = {"image": IMAGE, "command": "echo small"}
    status, body = await gw.json("POST", "/api/v1/queues/deep/jobs", json={"definition": fits})
    assert status == 201, body
    await stack.worker("deep", memory_limit_bytes=64 * 1024 * 1024)
    job = await gw.wait_job("deep", body["jobId"], timeout=60)
    assert job["reason"] == "success", job
    status, listing = await gw.json("GET", "/api/v1/queues/deep/jobs")
    assert status == 200
    states = [(j["state"], j["attempts"]) for j in listing["jobs"] if j["jobId"] != job["jobId"]]
    assert states == [("queued", 0)] * 300


async def test_cancel_a_running_job(stack: Stack, gw: Gateway) -> None:
    await stack.worker("stop")
    status, body = await gw.json(
        "POST",
        "/api/v1/queues/stop/jobs",
        json={"definition": {"image": IMAGE, "command": "sleep 60"}},
    )
    assert status == 201, body
    jid = body["jobId"]
    await gw.wait_state("stop", jid, lambda job: job["startedMs"] is not None)
    status, job = await gw.json("POST", f"/api/v1/queues/stop/jobs/{jid}/cancel")
    assert status == 200 and job["cancelRequested"] is True
    job = await gw.wait_job("stop", jid, timeout=60)
    assert job["reason"] == "cancelled"


async def collect(
    gw: Gateway, path: str, *, last_event_id: str | None = None, stop_after: int | None = None
) -> list[dict[str, Any]]:
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(120), gw.http.get(path, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        async for ev in read_events(resp):
            if ev["event"] == "hello":
                continue
            out.append(ev)
            if ev["event"] == "end" or (stop_after is not None and len(out) >= stop_after):
                break
    return out


LINES_JOB = {
    "image": IMAGE,
    "command": "sh -c 'for i in 1 2 3 4 5 6; do echo line$i; sleep 0.4; done; echo bye >&2'",
}


async def test_job_stream_replays_and_follows(stack: Stack, gw: Gateway) -> None:
    await stack.worker("sse")
    status, body = await gw.json("POST", "/api/v1/queues/sse/jobs", json={"definition": LINES_JOB})
    assert status == 201, body
    jid = body["jobId"]
    live = await collect(gw, f"/api/v1/queues/sse/jobs/{jid}/events")
    kinds = [e["event"] for e in live]
    assert kinds[0] == "state" and kinds[-1] == "end"
    states = [e["data"]["state"] for e in live if e["event"] == "state"]
    assert states[0] in ("queued", "running") and states[-1] == "finished"
    stdout = "".join(
        c["text"]
        for e in live
        if e["event"] == "log"
        for c in e["data"]["chunks"]
        if c["stream"] == "stdout"
    )
    assert stdout == "".join(f"line{i}\n" for i in range(1, 7))
    end = live[-1]["data"]
    assert end["result"]["exitCode"] == 0 and end["reason"] == "success"
    # ids only grow
    ids = [tuple(map(int, e["id"].split("-"))) for e in live if e["id"]]
    assert ids == sorted(ids)
    # a second client after the end gets the same history, replayed
    replay = await collect(gw, f"/api/v1/queues/sse/jobs/{jid}/events")
    assert [e["data"] for e in replay if e["event"] == "log"] == [
        e["data"] for e in live if e["event"] == "log"
    ]
    assert replay[-1]["data"]["result"] == end["result"]


async def test_sse_resume_after_a_dropped_connection_loses_no_event(
    stack: Stack, gw: Gateway
) -> None:
    await stack.worker("resume")
    status, body = await gw.json(
        "POST", "/api/v1/queues/resume/jobs", json={"definition": LINES_JOB}
    )
    assert status == 201, body
    jid = body["jobId"]
    path = f"/api/v1/queues/resume/jobs/{jid}/events"
    first = await collect(gw, path, stop_after=3)  # then the connection drops
    with_id = [e for e in first if e["id"]]
    # events happen while nobody listens: the job logs more than the client had
    had = int(with_id[-1]["id"].split("-")[1])
    await logged_after(stack, gw, "resume", jid, had)
    rest = await collect(gw, path, last_event_id=with_id[-1]["id"])
    full = await collect(gw, path)  # the whole history, from scratch, once finished

    def key(events: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
        return [(e["event"], e["id"], e["data"]) for e in events if e["id"]]

    # everything up to the last event the client had, then everything after it: no gap, no dup
    resumed = key(with_id) + key(rest)
    logs = [k for k in resumed if k[0] == "log"]
    assert [k[2] for k in logs] == [k[2] for k in key(full) if k[0] == "log"]
    before_end = [k[1] for k in resumed if k[0] != "end"]  # `end` repeats the final id
    assert len(set(before_end)) == len(before_end)
    assert resumed[-1][0] == "end" and rest[-1]["data"]["reason"] == "success"
    text = "".join(c["text"] for k in logs for c in k[2]["chunks"] if c["stream"] == "stdout")
    assert text == "".join(f"line{i}\n" for i in range(1, 7))


async def logged_after(stack: Stack, gw: Gateway, queue: str, job: str, seq: int) -> None:
    """Until the job's log holds a message after log sequence ``seq``."""

    async def more() -> bool:
        status, page = await gw.json(
            "GET", f"/api/v1/queues/{queue}/jobs/{job}/logs?cursor={seq + 1}"
        )
        assert status == 200, page
        return bool(page["chunks"])

    await on_the_log(await stack.peer(), subjects.logs_subject(queue, job), more)


async def test_compute_queues_stream(stack: Stack, gw: Gateway) -> None:
    await stack.worker("pcg")
    status, body = await gw.json("POST", "/q/pcg", json={"definition": LINES_JOB})
    assert status == 200 and body["success"] is True, body
    events = []
    async with asyncio.timeout(120), gw.http.get(f"/q/pcg/j/{body['jobId']}/stream") as resp:
        async for ev in read_events(resp):
            events.append(ev)
            if ev["event"] == "final":
                break
    names = {e["event"] for e in events}
    assert {"state", "run-log", "final"} <= names
    run = "".join(line for e in events if e["event"] == "run-log" for line in e["data"]["lines"])
    assert "line6\n" in run and "bye\n" in run
    assert events[-1]["data"]["finished"]["result"]["StatusCode"] == 0


async def test_job_stream_survives_a_nats_restart(stack: Stack, gw: Gateway) -> None:
    status, body = await gw.json(
        "POST", "/api/v1/queues/bounce/jobs", json={"definition": LINES_JOB}
    )
    assert status == 201, body
    jid = body["jobId"]
    events: list[dict[str, Any]] = []
    waiting = asyncio.Event()

    async def listen() -> None:
        async with (
            asyncio.timeout(180),
            gw.http.get(f"/api/v1/queues/bounce/jobs/{jid}/events") as resp,
        ):
            async for ev in read_events(resp):
                events.append(ev)
                if ev["event"] == "waiting":
                    waiting.set()
                if ev["event"] == "end":
                    return

    task = asyncio.create_task(listen())
    async with asyncio.timeout(60):  # the stream is open, and says why the job waits
        await waiting.wait()
    await asyncio.to_thread(stack.nats.restart)
    await stack.worker("bounce")  # a worker that joins after the restart runs the job
    await asyncio.wait_for(task, 180)
    assert events[-1]["event"] == "end" and events[-1]["data"]["reason"] == "success"
    stdout = "".join(
        c["text"]
        for e in events
        if e["event"] == "log"
        for c in e["data"]["chunks"]
        if c["stream"] == "stdout"
    )
    assert stdout == "".join(f"line{i}\n" for i in range(1, 7))
    status, _ = await gw.json("GET", "/healthz")
    assert status == 200


async def test_queue_stream(stack: Stack, gw: Gateway) -> None:
    peer = await stack.peer()
    first = await jobs.submit(peer, "qs", {"image": IMAGE, "command": "echo one"})
    seen: dict[str, str] = {}
    workers: list[Any] = []
    opened = asyncio.Event()

    async def listen() -> None:
        async with asyncio.timeout(120), gw.http.get("/api/v1/queues/qs/events") as resp:
            async for ev in read_events(resp):
                if ev["event"] == "job":
                    seen[ev["data"]["jobId"]] = ev["data"]["state"]
                    opened.set()
                elif ev["event"] == "workers":
                    workers.append(ev["data"])
                if len(seen) == 2 and all(s == "finished" for s in seen.values()):
                    return

    task = asyncio.create_task(listen())
    async with asyncio.timeout(30):  # the stream is open (it had the first job)
        await opened.wait()
    assert seen == {first.job_id: "queued"}
    second = await jobs.submit(peer, "qs", {"image": IMAGE, "command": "echo two"})
    await stack.worker("qs")
    await asyncio.wait_for(task, 120)
    assert set(seen) == {first.job_id, second.job_id}
    assert workers[0] == [] and any(len(w) == 1 for w in workers)
