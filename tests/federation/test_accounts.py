"""Confined credentials (deploy/nats/accounts): a worker for queue alpha can run alpha's jobs
through the whole lease protocol, and cannot read, claim or even list queue beta, nor list
streams, consumers or subjects. An institution's own account sees nothing of the shared one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from refusals import Refusals
from topology import ACCOUNT_PASSWORDS, Node

from asman.errors import ConfigError, LogError
from asman.log import jobs, namespaces, subjects
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.leases import WaitingIndex, claim
from asman.log.logstream import append_logs, read_logs
from asman.log.workers import WorkerInfo, beat, list_workers

DEF_A = {"image": "asman/busybox:local", "command": "echo alpha"}
DEF_B = {"image": "asman/busybox:local", "command": "echo beta"}


@pytest.fixture
async def logs(server: Node) -> AsyncIterator[dict[str, Log]]:
    opened: dict[str, Log] = {}

    async def open_log(user: str, **overrides: Any) -> Log:
        config = LogConfig(servers=(server.url_as(user, ACCOUNT_PASSWORDS[user]),), **overrides)
        log = Log(config, PeerKey.generate())
        await log.connect()
        opened[user] = log
        return log

    await open_log("admin")  # trusted: creates the streams
    confined = {"manage_streams": False, "reads": "consumer", "request_timeout_s": 1.0}
    await open_log("worker-alpha", inbox_prefix="_INBOX.worker-alpha", **confined)
    await open_log("client-alpha", inbox_prefix="_INBOX.client-alpha", **confined)
    try:
        yield opened
    finally:
        for log in opened.values():
            await log.close()


async def test_a_confined_worker_runs_its_queue(logs: dict[str, Log]) -> None:
    client, worker = logs["client-alpha"], logs["worker-alpha"]
    submitted = await jobs.submit(client, "alpha", DEF_A)
    assert submitted.created
    assert [j.job_id for j in await jobs.list_jobs(worker, "alpha")] == [submitted.job_id]

    # the worker finds the job in the queue's waiting index (a filtered read: no consumer
    # of its own, so nothing for an admin to create first), follows it live, and claims it
    heard = asyncio.Event()
    index = await WaitingIndex(worker, "alpha", heard).open()
    await index.scan()
    (entry,) = index.entries.values()
    assert entry.job_id == submitted.job_id and entry.waiting
    lease = await claim(worker, "alpha", entry.job_id, entry.entry.seq)
    assert lease is not None
    await lease.start()
    chunk = ("stdout", 0, b"alpha\n")
    await append_logs(worker, "alpha", submitted.job_id, lease.attempt, [chunk])
    me = WorkerInfo(worker_id=worker.peer_id, queue="alpha", slots=1, free_slots=0)
    await beat(worker, me)
    assert [w.worker_id for w in await list_workers(client, "alpha")] == [worker.peer_id]
    heard.clear()
    final = await lease.finish({"reason": "success", "exit_code": 0})
    assert final.reason == "success"
    # the finished job leaves the worker's index: its subscription hears the tombstone
    try:
        async with asyncio.timeout(10):
            while index.entries:
                await heard.wait()
                heard.clear()
    finally:
        await index.close()
    assert index.entries == {}
    state = await jobs.wait_finished(client, "alpha", submitted.job_id, timeout=10)
    assert state.result is not None and state.result.worker == worker.peer_id
    chunks, _ = await read_logs(client, state)
    assert [c.data for c in chunks] == [b"alpha\n"]


async def test_a_confined_client_holds_replaces_and_releases_namespaces(
    logs: dict[str, Log],
) -> None:
    """Namespace holds are events on the job's own subject and the search for a namespace's
    other jobs reads the queue's waiting index: a client's queue permissions cover both."""
    client = logs["client-alpha"]
    older = await namespaces.submit(client, "alpha", DEF_A, namespace="n")
    await jobs.submit(client, "alpha", DEF_A, namespace="m")
    newer = await namespaces.submit(client, "alpha", DEF_B, namespace="n")
    assert [r.job_id for r in newer.replacing] == [older.job_id]
    (kept,) = await namespaces.replace_now(client, newer.replacing)
    assert kept is not None and kept.namespaces == ("m",) and kept.state == "queued"
    ended = await jobs.cancel(client, "alpha", older.job_id, namespace="m")
    assert ended.reason == "cancelled"


async def test_a_confined_worker_cannot_read_claim_or_list_another_queue(
    logs: dict[str, Log],
) -> None:
    admin, worker = logs["admin"], logs["worker-alpha"]
    beta = await jobs.submit(admin, "beta", DEF_B)
    beta_subject = subjects.job_subject("beta", beta.job_id)

    # through Asman: every way in is refused (a denied request never gets an answer)
    with pytest.raises(LogError):
        await jobs.read_job(worker, "beta", beta.job_id)
    with pytest.raises(LogError):
        await jobs.list_jobs(worker, "beta")
    with pytest.raises(LogError):
        await WaitingIndex(worker, "beta", asyncio.Event()).scan()
    with pytest.raises(LogError):
        await worker.append(beta_subject, {"type": "claimed", "ts": 0}, expected_last_seq=1)
    assert (await jobs.read_job(admin, "beta", beta.job_id)) == beta.state  # untouched


async def test_the_server_refuses_every_listing_and_every_foreign_subject(
    server: Node, logs: dict[str, Log]
) -> None:
    await jobs.submit(logs["admin"], "beta", DEF_B)
    refusals = Refusals()
    nc = await refusals.connect(
        server.url_as("worker-alpha", ACCOUNT_PASSWORDS["worker-alpha"]),
        inbox_prefix="_INBOX.worker-alpha",
    )
    try:
        api = "$JS.API"
        denied_requests = {
            f"{api}.INFO": b"",
            f"{api}.STREAM.NAMES": b"",
            f"{api}.STREAM.LIST": b"",
            f"{api}.STREAM.INFO.{subjects.JOBS_STREAM}": json.dumps(
                {"subjects_filter": ">"}
            ).encode(),
            f"{api}.STREAM.INFO.{subjects.WAITING_STREAM}": json.dumps(
                {"subjects_filter": ">"}
            ).encode(),
            f"{api}.CONSUMER.NAMES.{subjects.WAITING_STREAM}": b"",
            f"{api}.CONSUMER.LIST.{subjects.JOBS_STREAM}": b"",
            f"{api}.DIRECT.GET.{subjects.WAITING_STREAM}": json.dumps(
                {"multi_last": ["asman.waiting.>"], "batch": 100}
            ).encode(),
            # the payload-filtered reads: they could name any subject, so they are closed
            f"{api}.DIRECT.GET.{subjects.JOBS_STREAM}": json.dumps(
                {"seq": 1, "next_by_subj": "asman.job.>", "batch": 100}
            ).encode(),
            f"{api}.STREAM.MSG.GET.{subjects.JOBS_STREAM}": json.dumps({"seq": 1}).encode(),
            f"{api}.DIRECT.GET.{subjects.JOBS_STREAM}.asman.job.beta.*": b"",
            f"{api}.DIRECT.GET.{subjects.JOBS_STREAM}.asman.job.>": b"",
            # a read consumer on a foreign or wider filter, or a legacy unfiltered create
            f"{api}.CONSUMER.CREATE.{subjects.JOBS_STREAM}.x.asman.job.beta.*": b"{}",
            f"{api}.CONSUMER.CREATE.{subjects.JOBS_STREAM}.x.asman.job.>": b"{}",
            f"{api}.CONSUMER.CREATE.{subjects.JOBS_STREAM}": b"{}",
            f"{api}.CONSUMER.CREATE.{subjects.WAITING_STREAM}.x.asman.waiting.beta.*.*": b"{}",
            f"{api}.CONSUMER.DURABLE.CREATE.{subjects.JOBS_STREAM}.asman_alpha_cpu": b"{}",
        }
        denied_subs = (
            ">",
            "asman.>",
            "asman.job.beta.*",
            "asman.waiting.beta.*.*",
            "_INBOX.>",
            "$JS.EVENT.>",
        )
        await refusals.expect_refused(nc, denied_requests, denied_subs)

        # the subject form is safe: a filter in the payload that differs from the subject's
        # is refused by the server itself
        create = f"{api}.CONSUMER.CREATE.{subjects.JOBS_STREAM}.sneaky.asman.job.alpha.*"
        body = {"stream_name": subjects.JOBS_STREAM, "config": {"name": "sneaky"}}
        for config in ({"filter_subject": "asman.job.beta.*"}, {"filter_subjects": [">"]}):
            body["config"] = {"name": "sneaky", "ack_policy": "none", **config}
            reply = await nc.request(create, json.dumps(body).encode(), timeout=2)
            assert "error" in json.loads(reply.data), reply.data
    finally:
        await nc.close()


async def test_an_institution_account_shares_nothing(server: Node, logs: dict[str, Log]) -> None:
    await jobs.submit(logs["admin"], "alpha", DEF_A)
    config = LogConfig(servers=(server.url_as("uni-x", ACCOUNT_PASSWORDS["uni-x"]),))
    async with Log(config, PeerKey.generate()) as uni:
        assert await jobs.list_jobs(uni, "alpha") == []  # its own, empty streams
        own = await jobs.submit(uni, "internal", DEF_A)
        assert [j.job_id for j in await jobs.list_jobs(uni, "internal")] == [own.job_id]
    assert await jobs.list_jobs(logs["admin"], "internal") == []


async def test_filtered_reads_return_what_direct_reads_return(
    server: Node, logs: dict[str, Log]
) -> None:
    admin = logs["admin"]
    subject = subjects.job_subject("alpha", "a" * 64)
    for i in range(300):  # more than one pull batch
        await admin.js.publish(subject, f"m{i}".encode())
    await admin.js.publish(subjects.job_subject("alpha", "b" * 64), b"other")
    config = LogConfig(
        servers=(server.url_as("admin", ACCOUNT_PASSWORDS["admin"]),), reads="consumer"
    )
    async with Log(config, PeerKey.generate()) as filtered:
        for flt, start in ((subject, 1), (subject, 250), (subjects.jobs_filter("alpha"), 1)):
            direct = await admin.read_subject(subjects.JOBS_STREAM, flt, start)
            assert await filtered.read_subject(subjects.JOBS_STREAM, flt, start) == direct
        empty = subjects.job_subject("alpha", "c" * 64)
        assert await filtered.read_subject(subjects.JOBS_STREAM, empty) == []
        info = await admin.js.consumers_info(subjects.JOBS_STREAM)
        assert info == [], "read consumers are deleted after each read"
    with pytest.raises(ConfigError):
        LogConfig(reads="everything")
