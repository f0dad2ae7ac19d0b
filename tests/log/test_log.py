"""The log protocol against a real nats-server: submit, claim races, fencing, forgery,
attempts, cancel, restart. No stand-ins: ack deadlines, redelivery and CAS are the point."""

from __future__ import annotations

import asyncio

import pytest
from adversary import MakeLog
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from asman.errors import (
    Conflict,
    InvalidQueueName,
    LeaseLost,
    LogUnavailable,
    UnauthorizedSigner,
)
from asman.log import jobs, subjects, wire
from asman.log.connection import Log
from asman.log.events import JobState, now_ms
from asman.log.leases import Candidate, JobLease, WaitingIndex, claim, finish_lost
from asman.log.logstream import append_logs, read_logs
from asman.log.server import NatsServer
from asman.log.workers import WorkerInfo, beat, list_workers

DEF = {"image": "asman/busybox:local", "command": "echo hi"}


def definition(n: int) -> dict[str, object]:
    return {"image": "asman/busybox:local", "command": f"echo {n}"}


async def index(log: Log, queue: str) -> dict[str, Candidate]:
    """The queue's waiting index as a worker's scan sees it."""
    idx = WaitingIndex(log, queue, asyncio.Event())
    await idx.scan()
    return idx.entries


async def waiting_ids(log: Log, queue: str) -> list[str]:
    return [c.job_id for c in (await index(log, queue)).values() if c.waiting]


async def until_no_waiting(log: Log, queue: str, timeout: float = 10) -> None:
    """Until no entry of ``queue``'s waiting index says a job waits. The finisher marks the
    entry done without waiting for the server's answer, so another connection sees it a
    moment later: follow the index as the server stores it (the last entry of each job,
    then each new one, on an ordered consumer) instead of polling it."""
    waiting: dict[str, bool] = {}
    caught_up = asyncio.Event()  # the last entry of every job is in, as of the latest one
    changed = asyncio.Event()

    async def on_entry(msg: Msg) -> None:
        entry = wire.parse_entry(msg.data)
        waiting[msg.subject] = entry is not None and entry.kind == wire.ENTRY_WAITING
        if msg.metadata.num_pending == 0:
            caught_up.set()
        changed.set()

    sub = await log.js.subscribe(
        subjects.waiting_filter(queue),
        cb=on_entry,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )
    try:
        info = await sub.consumer_info()
        if not info.num_pending and not info.delivered.consumer_seq:
            caught_up.set()  # the index of the queue is empty
        async with asyncio.timeout(timeout):
            while not caught_up.is_set() or any(waiting.values()):
                changed.clear()
                await changed.wait()
    except TimeoutError:
        raise AssertionError(f"{queue} still has waiting entries: {waiting}") from None
    finally:
        await sub.unsubscribe()


async def claim_next(log: Log, queue: str, **kwargs: object) -> JobLease:
    """Claim the oldest waiting job of ``queue``, as a worker's dispatcher would."""
    entries = sorted((await index(log, queue)).values(), key=lambda c: c.order)
    for cand in entries:
        if cand.waiting:
            lease = await claim(log, queue, cand.job_id, cand.entry.seq, **kwargs)  # type: ignore[arg-type]
            if lease is not None:
                return lease
    raise AssertionError(f"nothing to claim on {queue}: {entries}")


async def dead(state: JobState) -> bool:
    return False


async def alive(state: JobState) -> bool:
    return True


async def test_streams_are_created_idempotently_and_updated(make_log: MakeLog) -> None:
    log = await make_log()
    await log.ensure_streams()
    await log.ensure_streams()
    info = await log.js.stream_info(subjects.JOBS_STREAM)
    assert info.config.metadata is not None
    assert info.config.metadata[subjects.META_WIRE] == str(wire.SCHEMA_VERSION)
    assert info.config.max_msgs_per_subject == log.rules.max_events
    # a peer with other defaults leaves existing streams alone...
    casual = await make_log(retention_s=3600)
    info = await casual.js.stream_info(subjects.JOBS_STREAM)
    assert info.config.max_age == 7 * 24 * 3600
    # ...an operator who asks updates them
    operator = await make_log(retention_s=3600, update_streams=True)
    info = await operator.js.stream_info(subjects.JOBS_STREAM)
    assert info.config.max_age == 3600


async def test_the_protocol_numbers_are_the_streams_not_each_peers(make_log: MakeLog) -> None:
    """Every peer folds with the same rules: the ones the jobs stream was made with, whatever
    its own configuration says (two peers with different numbers would disagree on who
    holds a lease)."""
    first = await make_log(lease_ttl_s=2.5, max_attempts=5)
    later = await make_log(lease_ttl_s=60.0, max_attempts=1)
    assert first.rules.lease_ms == later.rules.lease_ms == 2500
    assert first.rules.max_attempts == later.rules.max_attempts == 5


async def test_submit_twice_gives_one_job_and_one_entry(make_log: MakeLog) -> None:
    log = await make_log()
    first = await jobs.submit(log, "q1", DEF)
    second = await jobs.submit(log, "q1", dict(reversed(list(DEF.items()))))
    assert first.job_id == second.job_id
    assert first.created and not second.created
    assert second.state.state == "queued"
    assert await waiting_ids(log, "q1") == [first.job_id]
    assert [j.job_id for j in await jobs.list_jobs(log, "q1")] == [first.job_id]


async def test_bad_queue_name_never_reaches_the_log(make_log: MakeLog) -> None:
    log = await make_log()
    with pytest.raises(InvalidQueueName, match="letters, digits"):
        await jobs.submit(log, "a.b", DEF)
    info = await log.js.stream_info(subjects.JOBS_STREAM)
    assert info.state.messages == 0


async def run_to_success(log: Log, queue: str, exit_code: int = 0) -> JobLease:
    lease = await claim_next(log, queue)
    await lease.start()
    await lease.finish(
        {"reason": "success" if exit_code == 0 else "failed", "exit_code": exit_code}
    )
    return lease


async def test_submit_after_success_returns_the_cached_result(make_log: MakeLog) -> None:
    client, worker = await make_log(), await make_log()
    sub = await jobs.submit(client, "q", DEF)
    await run_to_success(worker, "q")
    again = await jobs.submit(client, "q", DEF)
    assert again.cached and not again.created
    assert again.state.result is not None and again.state.result.reason == "success"
    assert again.state.result.worker == worker.peer_id
    await until_no_waiting(client, "q")
    rerun = await jobs.submit(client, "q", DEF, rerun=True)
    assert rerun.requeued and rerun.state.state == "queued"
    assert await waiting_ids(client, "q") == [sub.job_id]


async def test_only_the_submitter_reruns_a_result(make_log: MakeLog) -> None:
    client, worker, stranger = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "q", DEF)
    await run_to_success(worker, "q")
    # a stranger's resubmission is served from cache; a forced re-run is refused
    assert (await jobs.submit(stranger, "q", DEF)).cached
    with pytest.raises(UnauthorizedSigner, match="only the peer that submitted it"):
        await jobs.submit(stranger, "q", DEF, rerun=True)
    state = await jobs.read_job(client, "q", sub.job_id)
    assert state is not None and state.reason == "success"


async def test_killed_client_between_event_and_entry_is_repaired(make_log: MakeLog) -> None:
    log = await make_log()
    from asman.log.definition import job_id

    jid = job_id(DEF)
    subject = subjects.job_subject("q", jid)
    # what a client that died after step 1 leaves behind: the event, no index entry
    await log.append(
        subject,
        {"type": "submitted", "ts": 1, "definition": jobs.definition_text(DEF), "class": "cpu"},
        expected_last_seq=0,
    )
    assert await waiting_ids(log, "q") == []
    again = await jobs.submit(log, "q", DEF)
    assert not again.created and again.state.state == "queued"
    assert await waiting_ids(log, "q") == [jid]


async def test_two_claimants_race_exactly_one_wins_200_times(make_log: MakeLog) -> None:
    client, a, b = await make_log(), await make_log(), await make_log()
    for n in range(200):
        sub = await jobs.submit(client, "race", definition(n))
        entry = (await index(client, "race"))[sub.job_id].entry
        # both workers saw the same entry and claim at once, on the same hint
        won = await asyncio.gather(
            claim(a, "race", sub.job_id, entry.seq, alive=alive),
            claim(b, "race", sub.job_id, entry.seq, alive=alive),
        )
        winners = [lease for lease in won if lease is not None]
        assert len(winners) == 1, f"round {n}: {len(winners)} winners"
        state = await jobs.read_job(client, "race", sub.job_id)
        assert state is not None and state.lease is not None
        assert state.lease.worker == winners[0].log.peer_id
        assert state.claims == 1
        await winners[0].finish({"reason": "success", "exit_code": 0})


async def test_a_gone_holder_is_challenged_and_its_result_refused(make_log: MakeLog) -> None:
    client = await make_log(lease_ttl_s=1.0)
    first, second = await make_log(), await make_log()
    sub = await jobs.submit(client, "fence", DEF)
    lease1 = await claim_next(first, "fence")
    await lease1.start()
    # the first worker stops (no heartbeat): the second challenges, waits out the grace
    # (1 s of server time) with no answer, and holds the lease
    lease2 = await claim(second, "fence", sub.job_id, alive=dead)
    assert lease2 is not None and lease2.attempt == 2
    with pytest.raises(LeaseLost):
        await lease1.finish({"reason": "success", "exit_code": 0})
    await lease2.finish({"reason": "failed", "exit_code": 3})
    state = await jobs.read_job(client, "fence", sub.job_id)
    assert state is not None and state.result is not None
    assert state.result.worker == second.peer_id and state.result.exit_code == 3
    assert sum(1 for h in state.history if h.type == "finished" and h.accepted) == 1
    assert state.holders == {first.peer_id, second.peer_id}
    await until_no_waiting(client, "fence")


async def test_a_live_holder_answers_and_keeps_its_lease(make_log: MakeLog) -> None:
    client = await make_log(lease_ttl_s=1.0)
    holder, other = await make_log(), await make_log()
    sub = await jobs.submit(client, "keep", DEF)
    lease = await claim_next(holder, "keep")
    # a worker that wrongly thinks the holder gone challenges it...
    taking = asyncio.create_task(claim(other, "keep", sub.job_id, alive=dead))
    subject = subjects.job_subject("keep", sub.job_id)
    async with asyncio.timeout(10):  # the challenge lands: the job's own events say so
        async for state in jobs.watch_job(client, "keep", sub.job_id):
            assert state.lease is not None
            if state.lease.challenge is not None:
                break
    assert state.lease.challenge is not None and state.lease.challenge.by == other.peer_id
    # ...and the holder, reading its job, answers at once
    answered = await lease.check()
    assert answered.lease is not None and answered.lease.challenge is None
    assert await asyncio.wait_for(taking, 10) is None
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == holder.peer_id
    assert done.claims == 1
    assert subject == lease.subject


async def test_forged_and_replayed_and_damaged_events_change_nothing(make_log: MakeLog) -> None:
    client, worker, forger = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "sec", DEF)
    lease = await claim_next(worker, "sec")
    before = await jobs.read_job(client, "sec", sub.job_id)
    assert before is not None
    subject = subjects.job_subject("sec", sub.job_id)

    async def last() -> int:
        return await client.last_seq(subjects.JOBS_STREAM, subject)

    # a finished signed by a key that holds no lease
    await forger.append(
        subject,
        {"type": "finished", "ts": 1, "reason": "success", "attempt": 1, "exit_code": 0},
        expected_last_seq=await last(),
    )
    # a cancel signed by someone who did not submit
    await forger.append(subject, {"type": "cancel", "ts": 1}, expected_last_seq=await last())
    # a genuine event of another job replayed onto this subject
    other = await jobs.submit(client, "sec", definition(99))
    other_subject = subjects.job_subject("sec", other.job_id)
    genuine = wire.seal(
        worker.key,
        other_subject,
        {"type": "finished", "ts": 1, "reason": "success", "attempt": 1, "prev": 0},
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
    client = await make_log(lease_ttl_s=0.5, max_attempts=2)
    workers = [await make_log() for _ in range(3)]
    sub = await jobs.submit(client, "lost", DEF)
    first = await claim_next(workers[0], "lost")
    assert first.attempt == 1  # then "crash": no heartbeat, no answer
    second = await claim(workers[1], "lost", sub.job_id, alive=dead)
    assert second is not None and second.attempt == 2 and not second.spent  # "crashes" too
    third = await claim(workers[2], "lost", sub.job_id, alive=dead)
    assert third is not None and third.attempt == 3 and third.spent
    with pytest.raises(LeaseLost):  # a spent attempt may only end the job
        await third.start()
    state = await finish_lost(third)
    assert state.reason == "worker_lost" and state.claims == 3
    await until_no_waiting(client, "lost")
    # worker_lost is not a result: submitting again runs it again
    again = await jobs.submit(client, "lost", DEF)
    assert again.requeued and again.state.state == "queued" and again.state.claims == 0


async def test_cancel_queued_and_running(make_log: MakeLog) -> None:
    client = await make_log(lease_ttl_s=0.5)
    worker, stranger = await make_log(), await make_log()
    queued = await jobs.submit(client, "c", definition(1))
    state = await jobs.cancel(client, "c", queued.job_id)
    assert state.reason == "cancelled"
    # a worker that still sees its entry finds nothing to do
    assert await claim(worker, "c", queued.job_id) is None

    running = await jobs.submit(client, "c", definition(2))
    lease = await claim_next(worker, "c")
    with pytest.raises(UnauthorizedSigner, match="only the peer that submitted"):
        await jobs.cancel(stranger, "c", running.job_id)
    state = await jobs.cancel(client, "c", running.job_id)
    assert state.cancel_requested and state.state == "running"
    assert (await lease.check()).cancel_requested
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.reason == "cancelled"
    # cancelling a finished job is a no-op
    assert (await jobs.cancel(client, "c", running.job_id)).reason == "cancelled"


async def test_a_cancel_the_worker_ignores_is_forced_after_the_grace(make_log: MakeLog) -> None:
    client = await make_log(lease_ttl_s=0.5)
    hoarder = await make_log()
    sub = await jobs.submit(client, "force", DEF)
    await claim_next(hoarder, "force")  # holds the job and never stops it
    requested = await jobs.cancel(client, "force", sub.job_id)
    assert requested.cancel_requested and not requested.finished
    # at once, a force is refused by the log (the worker may still be stopping)
    early = await jobs.cancel(client, "force", sub.job_id, force=True)
    assert not early.finished
    # once the grace has passed in server time, the first force ends the job
    ended = await force_after_grace(client, "force", sub.job_id)
    assert ended.reason == "cancelled"
    assert "did not stop the job in time" in (ended.result.message if ended.result else "")


async def force_after_grace(log: Log, queue: str, job: str) -> JobState:
    """Wait until the job's cancel request is ``lease_ms`` old in server time, then force
    the cancel once. The server runs on this machine, so its clock is ours: a force sent
    after the due time is stamped after it. Waiting for a time to pass is the condition
    itself here: the log has no event for it."""
    state = await jobs.read_job(log, queue, job)
    assert state is not None and state.cancel_ms is not None, state
    due_ms = state.cancel_ms + log.rules.lease_ms
    await asyncio.sleep(max(0.0, (due_ms - now_ms()) / 1000) + 0.002)
    return await jobs.cancel(log, queue, job, force=True)


async def test_release_hands_the_job_back_without_counting(make_log: MakeLog) -> None:
    client, a, b = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "rel", DEF)
    lease = await claim_next(a, "rel")
    await lease.release()
    assert await waiting_ids(client, "rel") == [sub.job_id]
    lease_b = await claim_next(b, "rel")
    assert lease_b.attempt == 1
    done = await lease_b.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == b.peer_id
    assert sub.job_id == done.job_id


async def test_watch_job_sees_every_state(make_log: MakeLog) -> None:
    client, worker = await make_log(), await make_log()
    sub = await jobs.submit(client, "w", DEF)
    seen: list[str] = []
    changed = asyncio.Event()

    async def watch() -> None:
        async for state in jobs.watch_job(client, "w", sub.job_id):
            seen.append(state.tes_state)
            changed.set()

    async def step() -> None:
        await asyncio.wait_for(changed.wait(), 10)
        changed.clear()

    task = asyncio.create_task(watch())
    await step()
    lease = await claim_next(worker, "w")
    await step()
    await lease.start()
    await step()
    await lease.finish({"reason": "success", "exit_code": 0})
    await asyncio.wait_for(task, 10)
    assert seen == ["QUEUED", "INITIALIZING", "RUNNING", "COMPLETE"]


async def test_heartbeats_are_listed_and_verified(make_log: MakeLog) -> None:
    worker, reader = await make_log(), await make_log()
    await beat(worker, WorkerInfo(worker.peer_id, "hb", slots=4, free_slots=3, gpus=1))
    await beat(worker, WorkerInfo(worker.peer_id, "other", slots=1, free_slots=1))
    # a heartbeat forged under another key's name is ignored
    fake = subjects.worker_subject("hb", "ab" * 32, "00")
    body = {"type": "worker", "queue": "hb", "slots": 99, "proc": "00"}
    await reader.publish_entry(fake, wire.seal(reader.key, fake, body))
    listed = await list_workers(reader, "hb")
    assert [(w.worker_id, w.slots, w.free_slots, w.gpus) for w in listed] == [
        (worker.peer_id, 4, 3, 1)
    ]
    assert listed[0].seen_ms is not None  # the server's time of the heartbeat


async def test_logs_are_batched_and_only_the_lease_holders_count(make_log: MakeLog) -> None:
    client, worker, intruder = await make_log(), await make_log(), await make_log()
    sub = await jobs.submit(client, "logs", DEF)
    await claim_next(worker, "logs")
    await append_logs(worker, "logs", sub.job_id, 1, [("stdout", 1, b"a\n"), ("stderr", 2, b"b\n")])
    await append_logs(intruder, "logs", sub.job_id, 1, [("stdout", 3, b"injected\n")])
    state = await jobs.read_job(client, "logs", sub.job_id)
    assert state is not None
    chunks, cursor = await read_logs(client, state)
    assert [(c.stream, c.data) for c in chunks] == [("stdout", b"a\n"), ("stderr", b"b\n")]
    more, _ = await read_logs(client, state, cursor)
    assert more == []


async def test_server_restart_loses_no_event_or_entry(
    make_log: MakeLog, nats_server: NatsServer
) -> None:
    client = await make_log()
    submitted = [await jobs.submit(client, "durable", definition(n)) for n in range(20)]
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    client.on_reconnect(on_reconnect)
    nats_server.restart()
    # the same connection reconnects by itself
    await asyncio.wait_for(reconnected.wait(), 30)
    assert client.nc.is_connected
    states = await jobs.list_jobs(client, "durable")
    assert sorted(s.job_id for s in states) == sorted(s.job_id for s in submitted)
    assert sorted(await waiting_ids(client, "durable")) == sorted(s.job_id for s in submitted)
    worker = await make_log()
    got = set()
    while len(got) < 20:
        lease = await claim_next(worker, "durable")
        await lease.finish({"reason": "success", "exit_code": 0})
        got.add(lease.job_id)
    assert got == {s.job_id for s in submitted}


async def test_an_append_no_stream_takes_is_unavailable_not_lost(make_log: MakeLog) -> None:
    """Appends wait for their acknowledgement on the connection's shared reply inbox: a
    subject no stream listens on is reported (no responders), never taken as written."""
    log = await make_log()
    with pytest.raises(LogUnavailable, match="no JetStream answered"):
        await log.append("not-asman.anything", {"type": "x"}, expected_last_seq=0)
    subject = subjects.job_subject("q", "f" * 64)
    first = await log.append(subject, {"type": "x"}, expected_last_seq=0)
    with pytest.raises(Conflict):
        await log.append(subject, {"type": "x"}, expected_last_seq=0)
    assert await log.append(subject, {"type": "x"}, expected_last_seq=first) > first


async def test_a_deep_queue_is_seen_through_a_bounded_window_oldest_first(
    make_log: MakeLog,
) -> None:
    """A worker keeps at most ``window`` waiting jobs of a queue in view, the oldest, and
    sees the next ones once those are gone: a deep queue costs it bounded memory."""
    client, worker = await make_log(), await make_log()
    ids = [(await jobs.submit(client, "deep", definition(n))).job_id for n in range(30)]
    heard = asyncio.Event()  # set on every live entry the index hears
    idx = WaitingIndex(worker, "deep", heard, window=8)
    await idx.open()
    try:
        await idx.scan()
        assert idx.more and idx.waiting_count == 8
        assert sorted(idx.entries, key=lambda j: idx.entries[j].order) == ids[:8]
        # a job submitted now is beyond the window too: heard, but not kept
        heard.clear()
        late = (await jobs.submit(client, "deep", definition(99))).job_id
        await asyncio.wait_for(heard.wait(), 10)
        assert late not in idx.entries and idx.waiting_count == 8 and idx.more
        seen: list[str] = []
        while len(seen) < 31:
            for job in sorted(idx.entries, key=lambda j: idx.entries[j].order):
                if job in seen:  # finished: its tombstone is on its way (not waited for)
                    continue
                lease = await claim(worker, "deep", job, idx.entries[job].entry.seq)
                assert lease is not None
                await lease.finish({"reason": "success", "exit_code": 0})
                seen.append(job)
                idx.forget(job)
            await idx.scan()
        assert seen == [*ids, late]
    finally:
        await idx.close()
