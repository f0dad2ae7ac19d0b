"""What a worker does when things go wrong, with real faults (issue 17).

Real worker processes get SIGTERM, SIGSTOP and SIGCONT; a real nats-server is stopped and
started again; a ``faults.LinkProxy`` on the worker's own connection drops a claim, or lets a
``finished`` through and loses the server's answer, or drops every blob chunk. Each test waits
for its point in the job's life on the log (or on Docker's events) and asserts the one outcome
a user should see: the job ends exactly once, with the right reason, by the right worker;
nothing is left running; the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faults import (
    LEASE_S,
    Cli,
    LinkProxy,
    accepted,
    alive,
    event_of,
    heartbeats,
    running_containers,
    until,
    wait_exited,
    wait_removed,
)
from s3server import SeaweedS3
from workerstack import IMAGE, Stack, output_bytes

from asman.log import jobs
from asman.log.connection import Log
from asman.log.definition import job_id
from asman.log.jobs import CAS_RETRIES
from asman.log.objstore import ObjectStoreBlobs
from asman.log.server import NatsServer
from asman.peer.s3 import S3Blobs

pytestmark = [pytest.mark.docker]


@pytest.fixture
async def proxy(nats_server: NatsServer) -> AsyncIterator[LinkProxy]:
    p = await LinkProxy(nats_server.port).start()
    try:
        yield p
    finally:
        await p.close()


def worker_args(queue: str, tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        "worker",
        queue,
        "--data-dir",
        str(tmp / name),
        "--key-file",
        str(tmp / f"{name}.key"),
        *extra,
    ]


def finished_count(state: Any) -> int:
    return accepted(state).count("finished")


# ---- signals to a worker process -----------------------------------------------------------


async def test_sigterm_mid_job_hands_the_job_back_and_another_worker_runs_it(
    cli: Cli, client: Log, tmp_path: Path
) -> None:
    """The drain grace runs out: the container is stopped, ``released`` goes on the log (not
    an attempt), the worker exits 0, and the next worker runs the job to its one result."""
    first = cli.start(*worker_args("tq", tmp_path, "a", "--drain-grace", "1s"), log="a.log")
    await heartbeats(client, "tq", 1)
    definition = {"image": IMAGE, "command": ["sh", "-c", "sleep 4; echo done > /outputs/r"]}
    sub = await jobs.submit(client, "tq", definition)
    running = await until(client, "tq", sub.job_id, lambda s: s.started_ms is not None)
    assert running.lease is not None
    holder = running.lease.worker
    ids = await asyncio.to_thread(running_containers, sub.job_id)
    since = time.time()
    first.send_signal(signal.SIGTERM)
    back = await until(client, "tq", sub.job_id, lambda s: "released" in accepted(s))
    assert not back.finished and back.lease is None
    assert await asyncio.to_thread(first.wait, 30) == 0
    await asyncio.to_thread(wait_removed, ids, since)
    assert "handed back" in cli.log("a.log")

    cli.start(*worker_args("tq", tmp_path, "b"), log="b.log")
    state = await jobs.wait_finished(client, "tq", sub.job_id, 60)
    assert state.reason == "success", state.result
    assert state.result is not None and state.result.worker != holder
    assert finished_count(state) == 1


async def test_a_worker_paused_past_its_lease_loses_the_job_and_discards_its_result(
    cli: Cli, client: Log, tmp_path: Path
) -> None:
    """SIGSTOP while its container runs: another worker challenges the silent holder and
    takes the job over after the grace. Woken, the first worker finds its lease gone, stops
    its container, keeps its result off the log, and goes on serving."""
    a = cli.start(*worker_args("sq", tmp_path, "a"), log="a.log")
    await heartbeats(client, "sq", 1)
    script = "sleep 8; echo done > /outputs/r"
    sub = await jobs.submit(client, "sq", {"image": IMAGE, "command": ["sh", "-c", script]})
    running = await until(client, "sq", sub.job_id, lambda s: s.started_ms is not None)
    assert running.lease is not None
    paused = running.lease.worker
    a_containers = await asyncio.to_thread(running_containers, sub.job_id)
    a.send_signal(signal.SIGSTOP)
    try:
        cli.start(*worker_args("sq", tmp_path, "b"), log="b.log")
        taken = await until(
            client,
            "sq",
            sub.job_id,
            lambda s: s.lease is not None and s.lease.worker != paused and s.started_ms is not None,
        )
        assert taken.claims == 2
    finally:
        a.send_signal(signal.SIGCONT)
    since = time.time()
    state = await jobs.wait_finished(client, "sq", sub.job_id, 60)
    assert state.reason == "success", state.result
    assert state.result is not None and state.result.worker != paused
    assert finished_count(state) == 1
    await asyncio.to_thread(wait_removed, a_containers, since - 5)
    # the woken worker serves on, and its discarded run never reached the log
    assert alive(a.pid)
    again = await jobs.wait_finished(client, "sq", sub.job_id, 5)
    assert finished_count(again) == 1 and again.result == state.result


# ---- the log and the blob store on the worker's own connection --------------------------------


async def test_a_claim_the_log_never_answered_is_tried_again(
    proxy: LinkProxy, stack: Stack, client: Log
) -> None:
    """The claim never reaches the server (LogUnavailable for the worker): it claims again a
    moment later and runs the job once."""
    definition = {"image": IMAGE, "command": "echo claimed at last"}
    jid = job_id(definition)
    proxy.drop(event_of("claimed", jid), times=1)
    await stack.start_worker("cq", via=proxy.url, lease_ttl_s=LEASE_S)
    sub = await jobs.submit(client, "cq", definition)
    state = await jobs.wait_finished(client, "cq", sub.job_id, 60)
    assert len(proxy.dropped) == 1, "the fault was never injected"
    assert state.reason == "success" and state.claims == 1, state.result


async def test_a_finished_whose_answer_was_lost_is_not_written_twice(
    proxy: LinkProxy, stack: Stack, client: Log, caplog: pytest.LogCaptureFixture
) -> None:
    """The server stores ``finished`` and its answer is lost with the connection: the worker
    reconnects, its retry is refused (the job moved on), and it finds its own result there;
    the job is finished once, not handed back, the worker reports the job's success (not a
    lost lease), and serves on."""
    caplog.set_level(logging.INFO, logger="asman")
    definition = {"image": IMAGE, "command": "echo the first reply is lost"}
    jid = job_id(definition)
    proxy.lose_reply(event_of("finished", jid))
    worker = await stack.start_worker("fq", via=proxy.url, lease_ttl_s=LEASE_S)
    sub = await jobs.submit(client, "fq", definition)
    state = await jobs.wait_finished(client, "fq", sub.job_id, 60)
    await asyncio.wait_for(proxy.reply_lost.wait(), 30)
    assert state.reason == "success" and state.claims == 1, state.result
    assert finished_count(state) == 1 and "released" not in accepted(state)
    nxt = await jobs.submit(client, "fq", {"image": IMAGE, "command": "echo still serving"})
    assert (await jobs.wait_finished(client, "fq", nxt.job_id, 60)).reason == "success"

    async def both_done() -> None:
        while worker.jobs_done < 2:  # the first one's finish is retried after its timeout
            worker.beaten.clear()
            await worker.beaten.wait()

    await asyncio.wait_for(both_done(), 60)
    assert proxy.connections >= 2  # the worker did reconnect
    mine = [r.getMessage() for r in caplog.records if jid in r.getMessage()]
    assert any("reason=success" in m for m in mine), mine
    assert not any("lease lost" in m or "failed" in m for m in mine), mine
    after = await jobs.read_job(client, "fq", jid)
    assert after is not None and finished_count(after) == 1


async def test_the_blob_store_silent_while_outputs_are_stored_hands_the_job_back(
    proxy: LinkProxy, stack: Stack, client: Log
) -> None:
    """Every blob chunk is dropped on the way (the store never answers): BlobUnavailable is
    not the job's failure, so the job is handed back, never finished ``error``; once the
    store answers again it runs to success with its outputs."""
    import nats

    nc = await nats.connect(proxy.url)
    try:
        silent = ObjectStoreBlobs(nc.jetstream(), timeout=2.0)
        await silent.ensure()
        proxy.drop(lambda subject, _: subject.startswith("$O."), times=10**9)
        await stack.start_worker("bq", blobs=silent, lease_ttl_s=LEASE_S)
        script = "head -c 400000 /dev/urandom > /outputs/big.bin; echo ok > /outputs/small"
        sub = await jobs.submit(client, "bq", {"image": IMAGE, "command": ["sh", "-c", script]})
        back = await until(client, "bq", sub.job_id, lambda s: "released" in accepted(s))
        assert not back.finished
        proxy.drop(lambda *_: False)  # the store answers again
        state = await jobs.wait_finished(client, "bq", sub.job_id, 90)
        assert state.reason == "success", state.result
        assert finished_count(state) == 1
        outputs = await output_bytes(await stack.blobs(client), state)
        assert len(outputs["big.bin"]) == 400000 and outputs["small"] == b"ok\n"
    finally:
        await nc.close()


async def test_the_log_down_while_a_job_runs_and_ends_the_job_still_ends_once(
    stack: Stack, client: Log, nats_server: NatsServer
) -> None:
    """nats-server stops while the container runs and the container ends meanwhile: the
    worker's ``finished`` rides out the outage (a compare-and-set retried), and the job ends
    once with its result when the server is back."""
    await stack.start_worker("dq", lease_ttl_s=LEASE_S)
    script = "sleep 2; echo survived > /outputs/r"
    sub = await jobs.submit(client, "dq", {"image": IMAGE, "command": ["sh", "-c", script]})
    await until(client, "dq", sub.job_id, lambda s: s.started_ms is not None)
    ids = await asyncio.to_thread(running_containers, sub.job_id)
    since = time.time()
    await asyncio.to_thread(nats_server.stop)
    try:
        await asyncio.to_thread(wait_exited, ids, since - 5)
    finally:
        await asyncio.to_thread(nats_server.start)
    state = await jobs.wait_finished(client, "dq", sub.job_id, 60)
    assert state.reason == "success" and state.claims == 1, state.result
    assert finished_count(state) == 1
    assert await output_bytes(await stack.blobs(client), state) == {"r": b"survived\n"}


# ---- one data dir, one worker ----------------------------------------------------------------


async def test_a_second_worker_on_the_same_data_dir_is_refused_and_the_first_serves_on(
    cli: Cli, client: Log, tmp_path: Path
) -> None:
    """The default --data-dir is shared by every worker a user starts: the second one must
    say so and exit, never clean up (and kill) the first one's containers."""
    first = cli.start(*worker_args("ddq", tmp_path, "same"), log="a.log")
    await heartbeats(client, "ddq", 1)
    script = "sleep 3; echo first > /outputs/r"
    sub = await jobs.submit(client, "ddq", {"image": IMAGE, "command": ["sh", "-c", script]})
    await until(client, "ddq", sub.job_id, lambda s: s.started_ms is not None)
    second = cli.start(*worker_args("ddq", tmp_path, "same"), log="b.log")
    assert await asyncio.to_thread(second.wait, 60) != 0
    assert "uses the data dir" in cli.log("b.log") and f"pid {first.pid}" in cli.log("b.log")
    state = await jobs.wait_finished(client, "ddq", sub.job_id, 60)
    assert state.reason == "success" and state.claims == 1, state.result
    assert alive(first.pid)


# ---- the waiting index ---------------------------------------------------------------------


async def test_the_sweep_repairs_a_lost_waiting_entry(stack: Stack, client: Log) -> None:
    """A job whose waiting entry was lost (a submitter that died between its two writes,
    or an entry marked done by mistake) is found by the worker's sweep and run."""
    sub = await jobs.submit(client, "wq", {"image": IMAGE, "command": "echo found"})
    state = await jobs.read_job(client, "wq", sub.job_id)
    assert state is not None
    await jobs.mark_done(client, "wq", state.job_class, sub.job_id)  # the entry is gone
    await stack.start_worker("wq", sweep_interval_s=1.0)
    done = await jobs.wait_finished(client, "wq", sub.job_id, 60)
    assert done.reason == "success" and done.claims == 1


async def test_a_claim_that_always_loses_its_race_gives_up_then_tries_again(
    proxy: LinkProxy, stack: Stack, client: Log, caplog: pytest.LogCaptureFixture
) -> None:
    """Another writer gets to the job's subject before every compare-and-set of one claim
    (the proxy puts a junk message ahead of each): the claim gives up ("too many concurrent
    writers") instead of spinning, the worker lives, and a later claim runs the job once."""
    caplog.set_level(logging.INFO, logger="asman")
    definition = {"image": IMAGE, "command": "echo raced"}
    jid = job_id(definition)
    proxy.race(event_of("claimed", jid), times=1 + CAS_RETRIES)  # the hint, then each retry
    await stack.start_worker("rq", via=proxy.url, lease_ttl_s=LEASE_S)
    sub = await jobs.submit(client, "rq", definition)
    state = await jobs.wait_finished(client, "rq", sub.job_id, 60)
    assert proxy.raced == 1 + CAS_RETRIES, "the race was never run"
    assert state.reason == "success" and state.claims == 1, state.result
    assert state.rejected >= CAS_RETRIES  # the junk is on the subject, and ignored
    assert any("too many concurrent writers" in r.getMessage() for r in caplog.records)


async def test_a_waiting_entry_that_lies_about_memory_neither_hides_nor_forces_a_job(
    stack: Stack, client: Log
) -> None:
    """Entries are unsigned hints. One that says a small job needs 1 TiB does not hide it
    (the worker reads the definition before passing it by); one that omits a big job's
    memory does not get it run under the ceiling (the worker hands it back untried)."""
    small = await jobs.submit(client, "lq", {"image": IMAGE, "command": "echo small"})
    big_def = {"image": IMAGE, "command": "echo big", "requirements": {"memory": "1 TiB"}}
    big = await jobs.submit(client, "lq", big_def)
    await jobs.mark_waiting(client, "lq", "cpu", small.job_id, small.state.last_seq, 2**40)
    await jobs.mark_waiting(client, "lq", "cpu", big.job_id, big.state.last_seq)  # no memory
    await stack.start_worker("lq", memory_limit_bytes=256 * 1024 * 1024)
    done = await jobs.wait_finished(client, "lq", small.job_id, 60)
    assert done.reason == "success"
    back = await until(client, "lq", big.job_id, lambda s: "released" in accepted(s))
    assert not back.finished and back.started_ms is None  # never run here


@pytest.mark.parametrize(
    "script",
    [
        "sleep 1; head -c 400000 /dev/urandom > /outputs/big.bin",  # outputs to store
        "sleep 1; head -c 300000 /dev/zero | tr '\\0' 'x'",  # a log too large to travel inline
    ],
    ids=["outputs", "log"],
)
async def test_the_s3_server_down_when_the_job_ends_hands_it_back_and_it_runs_again(
    stack: Stack, client: Log, tmp_path: Path, script: str
) -> None:
    """A real S3 outage (the server stopped by PID, started again on its ports): storing the
    outputs or the log fails with BlobUnavailable, the job is handed back (never ``error``),
    and once S3 is back it runs to success."""
    s3 = SeaweedS3(tmp_path / "s3")
    await asyncio.to_thread(s3.start)
    try:
        await asyncio.to_thread(s3.client().make_bucket, "out")
        blobs = S3Blobs.from_url(f"s3+http://{s3.endpoint}/out", s3.access_key, s3.secret_key)
        await stack.start_worker("s3q", blobs=blobs, lease_ttl_s=LEASE_S)
        # down before the job is submitted: a job touches S3 only once its container ended,
        # and a stop raced against a short container could come after the upload
        await asyncio.to_thread(s3.stop)
        sub = await jobs.submit(client, "s3q", {"image": IMAGE, "command": ["sh", "-c", script]})
        back = await until(client, "s3q", sub.job_id, lambda s: "released" in accepted(s))
        assert "started" in accepted(back)  # its container ran; its result could not be stored
        assert not back.finished
        await asyncio.to_thread(s3.restart)
        state = await jobs.wait_finished(client, "s3q", sub.job_id, 120)
        assert state.reason == "success", state.result
        assert finished_count(state) == 1
    finally:
        await asyncio.to_thread(s3.close)
