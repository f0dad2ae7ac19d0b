"""The worker end to end: real nats-server, real Docker engine, real blob store."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import time
import uuid
from typing import Any

import pytest
from aiohttp import web
from workerstack import IMAGE, Stack, containers_of, job_text, output_bytes, run_job

from asman.log import jobs

pytestmark = [pytest.mark.docker]


async def test_inputs_to_outputs_round_trip_byte_exact(stack: Stack) -> None:
    client = await stack.log()
    blobs = await stack.blobs(client)
    big = os.urandom(3 * 1024 * 1024 + 7)
    info = await blobs.put_bytes(big)
    await stack.start_worker("io")
    state = await run_job(
        client,
        "io",
        {
            "image": IMAGE,
            "command": "sh -c 'mkdir -p /outputs/a/b && cat /inputs/small.txt > /outputs/a/b/c.txt "
            "&& cp /inputs/nested/dir/big.bin /outputs/big.bin && cp /inputs/raw /outputs/raw'",
            "inputs": {
                "small.txt": {"type": "utf8", "value": "hello\n"},
                "nested/dir/big.bin": {"type": "blob", "value": info.sha256},
                "raw": {"type": "base64", "value": base64.b64encode(b"\x00\x01\xff").decode()},
            },
        },
    )
    assert state.reason == "success", state.result
    outs = await output_bytes(blobs, state)
    assert outs == {"a/b/c.txt": b"hello\n", "big.bin": big, "raw": b"\x00\x01\xff"}
    big_entry = next(f for f in state.result.outputs if f.path == "big.bin")  # type: ignore[union-attr]
    assert (
        big_entry.blob.key is not None and big_entry.blob.sha256 == hashlib.sha256(big).hexdigest()
    )
    assert containers_of(state.job_id) == []


async def test_failed_exit_code_and_stderr(stack: Stack) -> None:
    client = await stack.log()
    await stack.start_worker("fail")
    state = await run_job(client, "fail", {"image": IMAGE, "command": "sh -c 'echo X >&2; exit 7'"})
    assert state.reason == "failed" and state.result is not None
    assert state.result.exit_code == 7
    assert (await job_text(client, state)).get("stderr") == "X\n"
    assert state.result.log is not None and state.result.log.data is not None
    assert b"X\n" in state.result.log.data


async def test_max_duration_times_out_and_removes_the_container(stack: Stack) -> None:
    client = await stack.log()
    await stack.start_worker("slow")
    state = await run_job(
        client, "slow", {"image": IMAGE, "command": "sleep 30", "maxDuration": "2s"}
    )
    assert state.reason == "timed_out"
    assert state.result is not None and state.result.duration_ms is not None
    assert state.result.duration_ms < 15_000
    assert containers_of(state.job_id) == []


async def test_a_one_slot_worker_on_two_queues_serves_both_promptly(stack: Stack) -> None:
    """The queues share the one slot: the worker follows both queues' waiting entries live,
    so a job on either starts at once, whichever queue the last one came from (the idle
    rescan is 30 s here: it is not what finds them)."""
    client = await stack.log()
    await stack.start_worker("qa", queues=("qa", "qb"), slots=1, scan_interval_s=30.0)
    t = time.monotonic()
    for queue in ("qb", "qa", "qb"):
        definition = {"image": IMAGE, "command": ["true", queue, str(time.monotonic())]}
        state = await run_job(client, queue, definition, timeout=20)
        assert state.reason == "success"
    assert time.monotonic() - t < 20  # far from one 30 s poll per job


async def test_cancel_running_job(stack: Stack) -> None:
    client = await stack.log()
    await stack.start_worker("cancel")
    sub = await jobs.submit(client, "cancel", {"image": IMAGE, "command": "sleep 30"})
    async for state in jobs.watch_job(client, "cancel", sub.job_id):
        if state.started_ms is not None:
            break
    await jobs.cancel(client, "cancel", sub.job_id)
    state = await jobs.wait_finished(client, "cancel", sub.job_id, 30)
    assert state.reason == "cancelled"
    assert containers_of(sub.job_id) == []


@pytest.mark.slow
async def test_two_workers_fifty_jobs_each_runs_once(stack: Stack) -> None:
    client = await stack.log()
    await stack.start_worker("many", slots=2)
    await stack.start_worker("many", slots=2)
    subs = [
        await jobs.submit(client, "many", {"image": IMAGE, "command": f"echo {n}"})
        for n in range(50)
    ]
    states = await asyncio.gather(
        *(jobs.wait_finished(client, "many", s.job_id, 180) for s in subs)
    )
    for n, state in enumerate(states):
        assert state.reason == "success"
        assert state.claims == 1
        assert sum(1 for h in state.history if h.type == "finished" and h.accepted) == 1
        text = await job_text(client, state)
        assert text.get("stdout") == f"{n}\n"
    workers = {s.result.worker for s in states if s.result}
    assert len(workers) == 2


async def test_hostile_outputs_and_url_inputs(stack: Stack, unused_tcp_port: int) -> None:
    client = await stack.log()

    async def forever(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            while True:
                await resp.write(b"x" * 65536)
                await asyncio.sleep(0)
        return resp

    app = web.Application()
    app.router.add_get("/forever", forever)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", unused_tcp_port)
    await site.start()
    try:
        # the server is on loopback: allowed by name, as an operator would (--allow-url)
        await stack.start_worker(
            "hostile",
            url_input_limit=1024 * 1024,
            allow_urls=(f"127.0.0.1:{unused_tcp_port}",),
        )
        # a url input that never ends: bounded by the size limit, the job errors clearly
        state = await run_job(
            client,
            "hostile",
            {
                "image": IMAGE,
                "command": "true",
                "inputs": {
                    "f": {"type": "url", "value": f"http://127.0.0.1:{unused_tcp_port}/forever"}
                },
            },
        )
        assert state.reason == "error"
        assert state.result is not None and "over the limit" in state.result.message
        # a symlink in outputs pointing outside is not followed
        state = await run_job(
            client,
            "hostile",
            {
                "image": IMAGE,
                "command": "sh -c 'ln -s /etc/passwd /outputs/pw; echo ok > /outputs/ok'",
            },
        )
        assert state.reason == "success"
        assert [f.path for f in state.result.outputs] == ["ok"]  # type: ignore[union-attr]
        # the worker keeps serving
        state = await run_job(client, "hostile", {"image": IMAGE, "command": "echo still-here"})
        assert state.reason == "success"
    finally:
        await runner.cleanup()


async def test_job_needing_more_gpus_than_any_worker_is_refused_with_a_reason(
    stack: Stack,
) -> None:
    client = await stack.log()
    await stack.start_worker("gpuq")
    state = await run_job(
        client, "gpuq", {"image": IMAGE, "command": "true", "requirements": {"gpus": 2}}
    )
    assert state.reason == "error"
    assert state.result is not None
    assert "asks for 2 GPUs and no worker on queue 'gpuq' has that many" in state.result.message


@pytest.mark.s3
async def test_round_trip_through_s3_blobs(stack: Stack, s3_server: Any, s3_bucket: str) -> None:
    from asman.peer.s3 import S3Blobs

    def s3() -> S3Blobs:
        return S3Blobs.from_url(
            f"s3+http://{s3_server.endpoint}/{s3_bucket}/asman",
            s3_server.access_key,
            s3_server.secret_key,
        )

    client = await stack.log()
    blobs = s3()
    big = os.urandom(2 * 1024 * 1024 + 3)
    info = await blobs.put_bytes(big)
    await stack.start_worker("s3q", blobs=s3())
    state = await run_job(
        client,
        "s3q",
        {
            "image": IMAGE,
            "command": "sh -c 'mkdir -p /outputs/x/y && cp /inputs/in/big /outputs/x/y/big'",
            "inputs": {"in/big": {"type": "blob", "value": info.sha256}},
        },
    )
    assert state.reason == "success", state.result
    assert await output_bytes(blobs, state) == {"x/y/big": big}


async def test_build_job_and_failing_build(stack: Stack) -> None:
    client = await stack.log()
    await stack.start_worker("build")
    dockerfile = (
        f"FROM {IMAGE}\nARG WHO\nARG FRESH\nRUN echo BUILD_MARKER $WHO > /built\nCMD cat /built\n"
    )
    fresh = f"FRESH={uuid.uuid4().hex}"  # a new build spec each run: never a cached image
    state = await run_job(
        client,
        "build",
        {
            "build": {"dockerfile": dockerfile, "buildArgs": ["WHO=asman", fresh]},
            "command": "cat /built",
        },
    )
    assert state.reason == "success", state.result
    text = await job_text(client, state)
    assert text.get("stdout") == "BUILD_MARKER asman\n"
    assert "BUILD_MARKER" in text.get("build", "")
    assert state.result is not None and state.result.log is not None
    assert b"BUILD_MARKER asman" in (state.result.log.data or b"")
    failing = await run_job(
        client,
        "build",
        {"build": {"dockerfile": f"FROM {IMAGE}\nRUN echo about-to-fail && exit 3\n"}},
    )
    assert failing.reason == "error"
    assert failing.result is not None and "build" in failing.result.message.lower()
    build_text = (await job_text(client, failing)).get("build", "")
    assert "about-to-fail" in build_text
    assert "stdout" not in await job_text(client, failing)


async def test_hostile_definitions_written_straight_to_the_log(stack: Stack) -> None:
    """A peer that skips validation cannot make a worker write outside the job folder."""
    from asman.log import subjects
    from asman.log.definition import job_id
    from asman.log.events import now_ms

    client = await stack.log()
    await stack.start_worker("raw")
    bad = [
        {"image": IMAGE, "command": "true", "inputs": {"../escape": "x"}},
        {"image": IMAGE, "command": "true", "inputs": {"/etc/passwd": "x"}},
        {"image": IMAGE, "command": "true", "inputs": {"big": "x" * (100 * 1024)}},
    ]
    ids = []
    for definition in bad:
        jid = job_id(definition)
        await client.append(
            subjects.job_subject("raw", jid),
            {
                "type": "submitted",
                "ts": now_ms(),
                "definition": jobs.definition_text(definition),
                "class": "cpu",
            },
            expected_last_seq=0,
        )
        await jobs.mark_waiting(client, "raw", "cpu", jid, 0)
        ids.append(jid)
    for jid in ids:
        state = await jobs.wait_finished(client, "raw", jid, 60)
        assert state.reason == "error"
        assert state.result is not None and "invalid definition" in state.result.message
    assert not (stack.tmp / "escape").exists()
    # and the worker keeps serving
    assert (await run_job(client, "raw", {"image": IMAGE, "command": "true"})).reason == "success"
