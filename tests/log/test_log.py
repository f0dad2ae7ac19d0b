"""The log protocol against a real nats-server: submit, claim races, fencing, forgery,
attempts, cancel, restart. No stand-ins: ack deadlines, redelivery and CAS are the point."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from asman.errors import (
    Conflict,
    InvalidQueueName,
    LeaseLost,
    LogUnavailable,
    UnauthorizedSigner,
)
from asman.log import jobs, subjects, wire
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.leases import JobLease, TicketSource, claim
from asman.log.logstream import append_logs, read_logs
from asman.log.server import NatsServer
from asman.log.workers import WorkerInfo, beat, list_workers

MakeLog = Callable[..., Awaitable[Log]]

DEF = {"image": "asman/busybox:local", "command": "echo hi"}


def definition(n: int) -> dict[str, object]:
    return {"image": "asman/busybox:local", "command": f"echo {n}"}


@pytest.fixture
async def make_log(nats_url: str) -> AsyncIterator[MakeLog]:
    opened: list[Log] = []

    async def make(key: PeerKey | None = None, **overrides: object) -> Log:
        config = dataclasses.replace(LogConfig(servers=(nats_url,)), **overrides)  # type: ignore[arg-type]
        log = Log(config, key or PeerKey.generate())
        await log.connect()
        opened.append(log)
        return log

    yield make
    for log in opened:
        await log.close()


async def pending_count(log: Log) -> int:
    info = await log.js.stream_info(subjects.PENDING_STREAM)
    return int(info.state.messages)


async def fetch_one(log: Log, queue: str, timeout: float = 2.0) -> TicketSource:
    return await TicketSource(log, queue, "cpu").open()


async def take(source: TicketSource, timeout: float = 3.0) -> list:
    return await source.fetch(1, timeout)


async def test_streams_are_created_idempotently_and_updated(make_log: MakeLog) -> None:
    log = await make_log()
    await log.ensure_streams()
    await log.ensure_streams()
    # a peer with other defaults leaves existing streams alone...
    casual = await make_log(retention_s=3600)
    info = await casual.js.stream_info(subjects.JOBS_STREAM)
    assert info.config.max_age == 7 * 24 * 3600
    # ...an operator who asks updates them
    operator = await make_log(retention_s=3600, update_streams=True)
    info = await operator.js.stream_info(subjects.JOBS_STREAM)
    assert info.config.max_age == 3600


async def test_submit_twice_gives_one_job_and_one_ticket(make_log: MakeLog) -> None:
    log = await make_log()
    first = await jobs.submit(log, "q1", DEF)
    second = await jobs.submit(log, "q1", dict(reversed(list(DEF.items()))))
    assert first.job_id == second.job_id
    assert first.created and not second.created
    assert second.state.state == "queued"
    assert await pending_count(log) == 1
    assert [j.job_id for j in await jobs.list_jobs(log, "q1")] == [first.job_id]


async def test_bad_queue_name_never_reaches_the_log(make_log: MakeLog) -> None:
    log = await make_log()
    with pytest.raises(InvalidQueueName, match="letters, digits"):
        await jobs.submit(log, "a.b", DEF)
    info = await log.js.stream_info(subjects.JOBS_STREAM)
    assert info.state.messages == 0


async def run_to_success(log: Log, queue: str, exit_code: int = 0) -> JobLease:
    source = await TicketSource(log, queue, "cpu").open()
    (ticket,) = await source.fetch(1, 3)
    lease = await claim(log, ticket)
    assert lease is not None
    await lease.start()
    await lease.finish(
        {"reason": "success" if exit_code == 0 else "failed", "exit_code": exit_code}
    )
    await source.close()
    return lease


async def test_submit_after_success_returns_the_cached_result(make_log: MakeLog) -> None:
    client, worker = await make_log(), await make_log()
    sub = await jobs.submit(client, "q", DEF)
    await run_to_success(worker, "q")
    again = await jobs.submit(client, "q", DEF)
    assert again.cached and not again.created
    assert again.state.result is not None and again.state.result.reason == "success"
    assert again.state.result.worker == worker.peer_id
    assert await pending_count(client) == 0
    rerun = await jobs.submit(client, "q", DEF, rerun=True)
    assert rerun.requeued and rerun.state.state == "queued"
    assert await pending_count(client) == 1
    assert sub.job_id == rerun.job_id


async def test_killed_client_between_event_and_ticket_is_repaired(make_log: MakeLog) -> None:
    log = await make_log()
    from asman.log.definition import job_id

    jid = job_id(DEF)
    subject = subjects.job_subject("q", jid)
    # what a client that died after step 1 leaves behind: the event, no ticket
    await log.append(
        subject,
        {"type": "submitted", "ts": 1, "definition": jobs.definition_text(DEF), "class": "cpu"},
        expected_last_seq=0,
    )
    assert await pending_count(log) == 0
    again = await jobs.submit(log, "q", DEF)
    assert not again.created and again.state.state == "queued"
    assert await pending_count(log) == 1


async def test_two_claimants_race_exactly_one_wins_200_times(make_log: MakeLog) -> None:
    client, a, b = await make_log(), await make_log(), await make_log()
    source = await TicketSource(a, "race", "cpu").open()
    for n in range(200):
        sub = await jobs.submit(client, "race", definition(n))
        (ticket,) = await source.fetch(1, 3)
        assert ticket.job_id == sub.job_id
        # both peers hold the same delivery (as after a redelivery race) and claim at once
        won = await asyncio.gather(claim(a, ticket), claim(b, ticket))
        winners = [lease for lease in won if lease is not None]
        assert len(winners) == 1, f"round {n}: {len(winners)} winners"
        state = await jobs.read_job(client, "race", sub.job_id)
        assert state is not None and state.lease is not None
        assert state.lease.worker == winners[0].log.peer_id
        assert state.claims == 1
        await winners[0].finish({"reason": "success", "exit_code": 0})


async def test_stale_claimant_is_fenced_and_the_second_result_wins(make_log: MakeLog) -> None:
    client = await make_log()
    first = await make_log(lease_ttl_s=1.0)
    second = await make_log(lease_ttl_s=1.0)
    sub = await jobs.submit(client, "fence", DEF)
    src1 = await TicketSource(first, "fence", "cpu").open()
    src2 = await TicketSource(second, "fence", "cpu").open()
    (t1,) = await src1.fetch(1, 3)
    lease1 = await claim(first, t1)
    assert lease1 is not None
    await lease1.start()
    # the first worker stops renewing: after the ack wait the ticket goes to the second
    (t2,) = await src2.fetch(1, 5)
    assert t2.job_id == sub.job_id and t2.delivered == 2
    lease2 = await claim(second, t2)
    assert lease2 is not None and lease2.attempt == 2
    with pytest.raises(LeaseLost):
        await lease1.finish({"reason": "success", "exit_code": 0})
    await lease2.finish({"reason": "failed", "exit_code": 3})
    state = await jobs.read_job(client, "fence", sub.job_id)
    assert state is not None and state.result is not None
    assert state.result.worker == second.peer_id and state.result.exit_code == 3
    assert sum(1 for h in state.history if h.type == "finished" and h.accepted) == 1
    assert await pending_count(client) == 0


async def test_in_progress_keeps_the_lease(make_log: MakeLog) -> None:
    client = await make_log()
    holder = await make_log(lease_ttl_s=1.0)
    other = await make_log(lease_ttl_s=1.0)
    await jobs.submit(client, "keep", DEF)
    (ticket,) = await (await TicketSource(holder, "keep", "cpu").open()).fetch(1, 3)
    lease = await claim(holder, ticket)
    assert lease is not None
    other_source = await TicketSource(other, "keep", "cpu").open()
    for _ in range(8):  # 2.4 s, more than twice the ack wait
        await lease.keepalive()
        assert await other_source.fetch(1, 0.3) == []
    await lease.finish({"reason": "success", "exit_code": 0})


async def test_forged_and_replayed_and_damaged_events_change_nothing(make_log: MakeLog) -> None:
    client, worker, forger = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "sec", DEF)
    source = await TicketSource(worker, "sec", "cpu").open()
    (ticket,) = await source.fetch(1, 3)
    lease = await claim(worker, ticket)
    assert lease is not None
    before = await jobs.read_job(client, "sec", sub.job_id)
    assert before is not None
    subject = subjects.job_subject("sec", sub.job_id)

    # a finished signed by a key that holds no lease
    await forger.append(
        subject,
        {"type": "finished", "ts": 1, "reason": "success", "attempt": 1, "exit_code": 0},
        expected_last_seq=None,
    )
    # a cancel signed by someone who did not submit
    await forger.append(subject, {"type": "cancel", "ts": 1}, expected_last_seq=None)
    # a genuine event of another job replayed onto this subject
    other = await jobs.submit(client, "sec", definition(99))
    other_subject = subjects.job_subject("sec", other.job_id)
    genuine = wire.seal(
        worker.key, other_subject, {"type": "finished", "ts": 1, "reason": "success", "attempt": 1}
    )
    await client.js.publish(subject, genuine)
    # truncated and bit-flipped envelopes of a real finished event by the holder
    real = wire.seal(
        worker.key,
        subject,
        {"type": "finished", "ts": 1, "reason": "success", "attempt": 1, "exit_code": 0},
    )
    await client.js.publish(subject, real[:-7])
    flipped = bytearray(real)
    flipped[len(flipped) // 2] ^= 0x01
    await client.js.publish(subject, bytes(flipped))
    await client.js.publish(subject, b"\xff\x00garbage")

    after = await jobs.read_job(client, "sec", sub.job_id)
    assert after is not None
    assert after.state == "running" and after.result is None and not after.cancel_requested
    assert after.lease == before.lease
    assert after.rejected == 6
    # the holder still finishes (its CAS follows the noise)
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == worker.peer_id


async def test_attempts_exhausted_finish_as_worker_lost(make_log: MakeLog) -> None:
    client = await make_log()
    worker = await make_log(lease_ttl_s=1.0, max_attempts=2)
    sub = await jobs.submit(client, "lost", DEF)
    source = await TicketSource(worker, "lost", "cpu").open()
    for attempt in (1, 2):
        (ticket,) = await source.fetch(1, 5)
        lease = await claim(worker, ticket)
        assert lease is not None and lease.attempt == attempt  # then "crash": never renew
    (ticket,) = await source.fetch(1, 5)
    assert await claim(worker, ticket) is None
    state = await jobs.read_job(client, "lost", sub.job_id)
    assert state is not None and state.reason == "worker_lost" and state.claims == 2
    await asyncio.sleep(0.2)
    assert await pending_count(client) == 0
    # worker_lost is not a result: submitting again runs it again
    again = await jobs.submit(client, "lost", DEF)
    assert again.requeued and again.state.state == "queued" and again.state.claims == 0


async def test_cancel_queued_and_running(make_log: MakeLog) -> None:
    client, worker, stranger = await make_log(), await make_log(), await make_log()
    queued = await jobs.submit(client, "c", definition(1))
    state = await jobs.cancel(client, "c", queued.job_id)
    assert state.reason == "cancelled"
    # its ticket is termed by the next worker that fetches it
    source = await TicketSource(worker, "c", "cpu").open()
    (ticket,) = await source.fetch(1, 3)
    assert await claim(worker, ticket) is None

    running = await jobs.submit(client, "c", definition(2))
    (ticket,) = await source.fetch(1, 3)
    lease = await claim(worker, ticket)
    assert lease is not None
    with pytest.raises(UnauthorizedSigner, match="only the peer that submitted"):
        await jobs.cancel(stranger, "c", running.job_id)
    state = await jobs.cancel(client, "c", running.job_id)
    assert state.cancel_requested and state.state == "running"
    assert (await lease.check()).cancel_requested
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.reason == "cancelled"
    # cancelling a finished job is a no-op
    assert (await jobs.cancel(client, "c", running.job_id)).reason == "cancelled"


async def test_release_hands_the_job_back_without_counting(make_log: MakeLog) -> None:
    client, a, b = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "rel", DEF)
    (ticket,) = await (await TicketSource(a, "rel", "cpu").open()).fetch(1, 3)
    lease = await claim(a, ticket)
    assert lease is not None
    await lease.release()
    (ticket,) = await (await TicketSource(b, "rel", "cpu").open()).fetch(1, 3)
    lease_b = await claim(b, ticket)
    assert lease_b is not None and lease_b.attempt == 1
    done = await lease_b.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == b.peer_id
    assert sub.job_id == done.job_id


async def test_watch_job_sees_every_state(make_log: MakeLog) -> None:
    client, worker = await make_log(), await make_log()
    sub = await jobs.submit(client, "w", DEF)
    seen: list[str] = []

    async def watch() -> None:
        async for state in jobs.watch_job(client, "w", sub.job_id):
            seen.append(state.tes_state)

    task = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    source = await TicketSource(worker, "w", "cpu").open()
    (ticket,) = await source.fetch(1, 3)
    lease = await claim(worker, ticket)
    assert lease is not None
    await asyncio.sleep(0.2)
    await lease.start()
    await asyncio.sleep(0.2)
    await lease.finish({"reason": "success", "exit_code": 0})
    await asyncio.wait_for(task, 10)
    assert seen == ["QUEUED", "INITIALIZING", "RUNNING", "COMPLETE"]


async def test_heartbeats_are_listed_and_verified(make_log: MakeLog) -> None:
    worker, reader = await make_log(), await make_log()
    await beat(worker, WorkerInfo(worker.peer_id, "hb", slots=4, free_slots=3, gpus=1))
    await beat(worker, WorkerInfo(worker.peer_id, "other", slots=1, free_slots=1))
    # a heartbeat forged under the worker's key name by another peer is ignored
    kv = await reader.workers_kv()
    fake_key = subjects.worker_key("hb", "ab" * 32)
    await kv.put(
        fake_key,
        wire.seal(
            reader.key,
            f"$KV.ASMAN_WORKERS.{fake_key}",
            {"type": "worker", "queue": "hb", "slots": 99},
        ),
    )
    listed = await list_workers(reader, "hb")
    assert [(w.worker_id, w.slots, w.free_slots, w.gpus) for w in listed] == [
        (worker.peer_id, 4, 3, 1)
    ]


async def test_logs_are_batched_and_only_the_lease_holders_count(make_log: MakeLog) -> None:
    client, worker, intruder = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "logs", DEF)
    (ticket,) = await (await TicketSource(worker, "logs", "cpu").open()).fetch(1, 3)
    lease = await claim(worker, ticket)
    assert lease is not None
    await append_logs(worker, "logs", sub.job_id, 1, [("stdout", 1, b"a\n"), ("stderr", 2, b"b\n")])
    await append_logs(intruder, "logs", sub.job_id, 1, [("stdout", 3, b"injected\n")])
    state = await jobs.read_job(client, "logs", sub.job_id)
    assert state is not None
    chunks, cursor = await read_logs(client, state)
    assert [(c.stream, c.data) for c in chunks] == [("stdout", b"a\n"), ("stderr", b"b\n")]
    more, _ = await read_logs(client, state, cursor)
    assert more == []


async def test_server_restart_loses_no_event_or_ticket(
    make_log: MakeLog, nats_server: NatsServer
) -> None:
    client = await make_log()
    submitted = [await jobs.submit(client, "durable", definition(n)) for n in range(20)]
    reconnects = client.nc.stats["reconnects"]
    nats_server.restart()
    # the same connection reconnects by itself
    for _ in range(100):
        if client.nc.stats["reconnects"] > reconnects and client.nc.is_connected:
            break
        await asyncio.sleep(0.1)
    states = await jobs.list_jobs(client, "durable")
    assert sorted(s.job_id for s in states) == sorted(s.job_id for s in submitted)
    assert await pending_count(client) == 20
    worker = await make_log()
    source = await TicketSource(worker, "durable", "cpu").open()
    got = set()
    while len(got) < 20:
        tickets = await source.fetch(5, 3)
        assert tickets, "tickets missing after restart"
        for t in tickets:
            lease = await claim(worker, t)
            assert lease is not None
            await lease.finish({"reason": "success", "exit_code": 0})
            got.add(t.job_id)
    assert got == {s.job_id for s in submitted}


async def test_an_append_no_stream_takes_is_unavailable_not_lost(make_log: MakeLog) -> None:
    """Appends wait for their acknowledgement on the connection's shared reply inbox: a
    subject no stream listens on is reported (no responders), never taken as written."""
    log = await make_log()
    with pytest.raises(LogUnavailable, match="no JetStream answered"):
        await log.append("not-asman.anything", {"type": "x"}, expected_last_seq=None)
    subject = subjects.job_subject("q", "f" * 64)
    first = await log.append(subject, {"type": "x"}, expected_last_seq=0)
    with pytest.raises(Conflict):
        await log.append(subject, {"type": "x"}, expected_last_seq=0)
    assert await log.append(subject, {"type": "x"}, expected_last_seq=first) > first
