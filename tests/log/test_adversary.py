"""A stranger who knows a queue's name and has a key of its own, against a real nats-server.

The attacker speaks the protocol with a raw nats-py connection: it signs well-formed events
with its own key (the wire format is public), chains them on the subject's last message
like an honest peer, replays other peers' envelopes byte for byte, and floods subjects. It
cannot forge another key's signature or the server's timestamps. Each test is one attack of
issue 12; the ones that need a real worker and Docker are in tests/peer/test_worker_adversary.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import nats
import nats.js.errors
import pytest
from adversary import Attacker, MakeLog, claim_waiting

from asman.errors import HistoryFull
from asman.log import jobs, subjects
from asman.log.connection import Log
from asman.log.definition import job_id
from asman.log.events import JobState, now_ms
from asman.log.leases import WaitingIndex, claim

DEF = {"image": "asman/busybox:local", "command": "echo the real job"}
EVIL = {"image": "asman/busybox:local", "command": "echo the attacker's job"}


async def no(_: JobState) -> bool:
    return False


async def test_squatting_a_job_id_with_another_definition_is_refused(
    make_log: MakeLog, attacker: Attacker
) -> None:
    """Attack 3: ``submitted`` carrying D' on the subject of job_id(D), even with a whole
    fake finished history behind it (a pre-seeded cached result)."""
    victim, worker = await make_log(), await make_log()
    jid = job_id(DEF)
    subject = subjects.job_subject("sq", jid)
    evil_event = {"type": "submitted", "definition": json.dumps(EVIL), "class": "cpu"}
    await attacker.sign_on_top(subject, evil_event)
    await attacker.sign_on_top(subject, {"type": "claimed"})
    fake = {"path": "result.txt", "size": 11, "sha256": "0" * 64, "data": b"FAKE RESULT"}
    await attacker.sign_on_top(
        subject, {"type": "finished", "reason": "success", "attempt": 1, "outputs": [fake]}
    )
    assert await jobs.read_job(victim, "sq", jid) is None  # nothing there is a job

    submitted = await jobs.submit(victim, "sq", DEF)
    assert submitted.job_id == jid and not submitted.cached
    assert submitted.state.definition == DEF and submitted.state.submitter == victim.peer_id
    assert submitted.state.rejected == 3
    lease = await claim_waiting(worker, "sq")
    assert lease.state.definition == DEF  # the worker runs the victim's definition
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == worker.peer_id
    assert done.result.outputs == ()


async def test_a_replayed_history_cannot_restore_a_result(
    make_log: MakeLog, attacker: Attacker
) -> None:
    """Attack 4: after a re-run, the job's old claimed/started/finished envelopes published
    again verbatim would have restored the old result; a stranger's ``requeued`` of a
    result is refused outright."""
    submitter, worker = await make_log(), await make_log()
    sub = await jobs.submit(submitter, "rp", DEF)
    lease = await claim_waiting(worker, "rp")
    await lease.start()
    await lease.finish({"reason": "success", "exit_code": 0, "message": "old result"})
    subject = subjects.job_subject("rp", sub.job_id)
    old = await attacker.history(subject)

    # a stranger may not re-run a job that has a result
    await attacker.sign_on_top(subject, {"type": "requeued"})
    state = await jobs.read_job(submitter, "rp", sub.job_id)
    assert state is not None and state.reason == "success" and state.rejected == 1

    # the submitter re-runs it; the attacker replays the old run byte for byte
    rerun = await jobs.submit(submitter, "rp", DEF, rerun=True)
    assert rerun.requeued and rerun.state.state == "queued"
    for envelope in old[1:]:  # claimed, started, finished
        await attacker.raw(subject, envelope)
    state = await jobs.read_job(submitter, "rp", sub.job_id)
    assert state is not None and state.state == "queued" and state.result is None
    notes = [h.note for h in state.history[-3:]]
    assert all("out of chain" in n for n in notes), notes
    # and the job runs again for real
    again = await claim_waiting(worker, "rp")
    final = await again.finish({"reason": "success", "exit_code": 0, "message": "new result"})
    assert final.result is not None and final.result.message == "new result"


async def test_vandalism_by_a_stranger_changes_nothing(
    make_log: MakeLog, attacker: Attacker
) -> None:
    """Attack 5: ``finished`` with reason ``worker_lost`` from any key on a running job;
    ``requeued`` from any key on a cached success."""
    submitter, worker = await make_log(), await make_log()
    running = await jobs.submit(submitter, "vd", {**DEF, "command": "echo 1"})
    lease = await claim_waiting(worker, "vd")
    subject = subjects.job_subject("vd", running.job_id)
    await attacker.sign_on_top(subject, {"type": "finished", "reason": "worker_lost", "attempt": 1})
    await attacker.sign_on_top(subject, {"type": "released", "attempt": 1})
    await attacker.sign_on_top(subject, {"type": "cancel"})
    state = await jobs.read_job(submitter, "vd", running.job_id)
    assert state is not None and state.state == "running" and not state.cancel_requested
    assert state.lease is not None and state.lease.worker == worker.peer_id
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.reason == "success"

    cached = await jobs.submit(submitter, "vd", {**DEF, "command": "echo 1"})
    assert cached.cached
    await attacker.sign_on_top(subject, {"type": "requeued"})
    state = await jobs.read_job(submitter, "vd", running.job_id)
    assert state is not None and state.reason == "success"
    assert [e.job_id for e in (await _waiting(submitter, "vd"))] == []


async def _waiting(log: Log, queue: str) -> list[Any]:
    index = WaitingIndex(log, queue, asyncio.Event())
    await index.scan()
    return [c for c in index.entries.values() if c.waiting]


async def test_a_claim_with_huge_declared_numbers_stalls_nothing(
    make_log: MakeLog, attacker: Attacker
) -> None:
    """Attacks 1 and 2 on the log: a claim declaring ``delivered`` 2^63-1 takes a queued job
    and is never finished. The numbers mean nothing; the claimant has no heartbeat, so a
    worker challenges it and holds the job one grace later (server time); the claimant's
    late events are refused. The submitter's cancel ends it too."""
    submitter = await make_log(lease_ttl_s=1.0)
    worker = await make_log()
    sub = await jobs.submit(submitter, "st", DEF)
    subject = subjects.job_subject("st", sub.job_id)
    huge = 2**63 - 1
    await attacker.sign_on_top(
        subject, {"type": "claimed", "ticket_seq": huge, "delivered": huge, "lease_ms": huge}
    )
    state = await jobs.read_job(submitter, "st", sub.job_id)
    assert state is not None and state.lease is not None
    assert state.lease.worker == attacker.key.peer_id  # it did take the queued job...
    t = time.monotonic()
    lease = await claim(worker, "st", sub.job_id, alive=no)  # ...until challenged
    assert lease is not None and lease.attempt == 2
    assert 1.0 <= time.monotonic() - t < 10
    await attacker.sign_on_top(subject, {"type": "started", "attempt": 1})
    await attacker.sign_on_top(
        subject, {"type": "finished", "reason": "success", "attempt": 1, "exit_code": 0}
    )
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == worker.peer_id

    # the same stall, ended by the submitter alone: cancel, then cancel again after the grace
    second = await jobs.submit(submitter, "st", {**DEF, "command": "echo 2"})
    subject2 = subjects.job_subject("st", second.job_id)
    await attacker.sign_on_top(subject2, {"type": "claimed", "delivered": huge})
    await jobs.cancel(submitter, "st", second.job_id)
    requested = await jobs.read_job(submitter, "st", second.job_id)  # with its server time
    assert requested is not None and requested.cancel_requested and not requested.finished
    assert requested.cancel_ms is not None
    # the grace runs in server time, and the server runs on this machine (its clock is
    # ours): wait for it to pass (the log has no event for a time passing), then the first
    # forced cancel ends the job
    due_ms = requested.cancel_ms + submitter.rules.lease_ms
    await asyncio.sleep(max(0.0, (due_ms - now_ms()) / 1000) + 0.002)
    ended = await jobs.cancel(submitter, "st", second.job_id, force=True)
    assert ended.reason == "cancelled"


async def test_history_bloat_is_bounded_and_costs_one_warning(
    make_log: MakeLog, attacker: Attacker, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack 6: 20,000 junk messages of 1 KB on one job's subject. The server refuses all
    but the first few hundred; a read stops there, says so in one warning, and the job ends
    ``error: history over limit`` rather than hanging; the other jobs of the queue list
    fine."""
    client = await make_log()
    victim = await jobs.submit(client, "bl", DEF)
    other = await jobs.submit(client, "bl", {**DEF, "command": "echo other"})
    subject = subjects.job_subject("bl", victim.job_id)
    junk = b"\x00" * 1024
    refused = 0
    for start in range(0, 20_000, 500):
        results = await asyncio.gather(
            *(attacker.raw(subject, junk) for _ in range(start, start + 500)),
            return_exceptions=True,
        )
        for r in results:
            if isinstance(r, nats.js.errors.APIError):
                assert r.err_code == 10077  # maximum messages per subject exceeded
                refused += 1
            else:
                assert isinstance(r, int), r
    limit = client.rules.max_events
    assert refused == 20_000 - (limit - 1)  # the subject held the submitted event already
    info = await client.js.stream_info(subjects.JOBS_STREAM, subjects_filter=subject)
    assert info.state.subjects == {subject: limit}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="asman.log"):
        state = await jobs.read_job(client, "bl", victim.job_id)
    assert state is not None and state.reason == "error"
    assert state.result is not None and "history over limit" in state.result.message
    assert state.events == limit and state.rejected == limit - 1
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"ignored {limit - 1} message(s)" in warnings[0].message
    listed = {s.job_id: s for s in await jobs.list_jobs(client, "bl")}
    assert listed[other.job_id].state == "queued"
    with pytest.raises(HistoryFull):  # nothing more is written there; the error says why
        await jobs.cancel(client, "bl", victim.job_id)  # (finished: cancel is a no-op)
        await client.append(subject, {"type": "cancel"}, expected_last_seq=state.last_seq)
