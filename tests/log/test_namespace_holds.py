"""Namespaces on the log (compute-queues §3.4), against a real nats-server: who may hold and
release a job for a namespace, one live job per namespace, and the grace of a replacement.

The stranger signs its events with its own key like any peer, and appends them by
compare-and-set on the subject's last message, so the fold, not the client's courtesy
checks, is what refuses them."""

from __future__ import annotations

import asyncio

import pytest
from adversary import MakeLog

from asman.errors import InvalidInput, UnauthorizedSigner
from asman.log import jobs, namespaces, subjects
from asman.log.connection import Log
from asman.log.events import JobState, now_ms
from asman.log.leases import JobLease, WaitingIndex, claim

DEF = {"image": "asman/busybox:local", "command": "sleep 30"}


def definition(n: int) -> dict[str, object]:
    return {"image": "asman/busybox:local", "command": f"sleep 3{n}"}


async def claim_job(worker: Log, queue: str, job: str) -> JobLease:
    """Claim ``job`` as a worker's dispatcher would, from its waiting-index entry."""
    idx = WaitingIndex(worker, queue, asyncio.Event())
    await idx.scan()
    cand = idx.entries[job]
    lease = await claim(worker, queue, job, cand.entry.seq)
    assert lease is not None
    return lease


async def read(log: Log, queue: str, job: str) -> JobState:
    state = await jobs.read_job(log, queue, job)
    assert state is not None
    return state


async def stranger_cancel(stranger: Log, queue: str, job: str, namespace: str) -> JobState:
    """A cancel naming ``namespace``, signed by ``stranger`` and appended on top of the job
    (no client-side check): what the fold makes of it."""
    before = await read(stranger, queue, job)
    await stranger.append(
        subjects.job_subject(queue, job),
        {"type": "cancel", "ts": now_ms(), "message": "mine now", "namespace": namespace},
        expected_last_seq=before.last_seq,
    )
    after = await read(stranger, queue, job)
    assert after.history[-1].type == "cancel", after.history
    return after


async def test_a_job_is_held_by_every_namespace_it_was_submitted_in(make_log: MakeLog) -> None:
    client, other = await make_log(), await make_log()
    subs = [await jobs.submit(client, "ns", DEF, namespace=n) for n in ("b", "a", "c")]
    assert len({s.job_id for s in subs}) == 1
    assert [s.created for s in subs] == [True, False, False]
    jid = subs[0].job_id
    await jobs.submit(client, "ns", DEF, namespace="a")  # held already: nothing appended
    await jobs.submit(other, "ns", DEF)  # another key, the default namespace
    state = await read(client, "ns", jid)
    assert state.namespaces == ("_", "a", "b", "c")
    assert [(h.namespace, h.key) for h in state.holds] == [
        ("b", client.peer_id),
        ("a", client.peer_id),
        ("c", client.peer_id),
        ("_", other.peer_id),
    ]
    assert state.rejected == 0 and len(state.history) == 4


async def test_cancel_of_one_namespace_leaves_the_job_to_the_others(make_log: MakeLog) -> None:
    client, worker = await make_log(), await make_log()
    for n in ("keep", "drop"):
        sub = await jobs.submit(client, "ns", DEF, namespace=n)
    jid = sub.job_id
    lease = await claim_job(worker, "ns", jid)
    await lease.start()

    state = await jobs.cancel(client, "ns", jid, namespace="drop")
    assert state.namespaces == ("keep",)
    assert state.state == "running" and not state.cancel_requested
    assert (await lease.check()).state == "running"

    state = await jobs.cancel(client, "ns", jid, namespace="keep")
    assert state.namespaces == () and state.cancel_requested
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.reason == "cancelled" and done.cq_state == ("Finished", "Cancelled")


async def test_star_removes_every_namespace_and_cancels(make_log: MakeLog) -> None:
    client = await make_log()
    for n in ("a", "b", "c"):
        sub = await jobs.submit(client, "ns", DEF, namespace=n)
    state = await jobs.cancel(client, "ns", sub.job_id, namespace="*")
    assert state.reason == "cancelled" and state.namespaces == ()


async def test_a_strangers_key_cannot_remove_another_keys_namespace(make_log: MakeLog) -> None:
    owner, stranger = await make_log(), await make_log()
    sub = await jobs.submit(owner, "ns", DEF, namespace="owned")
    jid = sub.job_id

    # the client refuses, saying why
    with pytest.raises(UnauthorizedSigner, match="added by another peer"):
        await jobs.cancel(stranger, "ns", jid, namespace="owned")
    with pytest.raises(InvalidInput, match="does not hold job"):
        await jobs.cancel(stranger, "ns", jid, namespace="never-held")
    # and the fold refuses the same events signed and appended anyway
    for namespace in ("owned", "never-held", "*"):
        state = await stranger_cancel(stranger, "ns", jid, namespace)
        assert not state.history[-1].accepted, state.history[-1]
        assert state.state == "queued" and state.namespaces == ("owned",)
    assert state.rejected == 3

    # a namespace of its own it may hold and remove: the owner's still holds the job
    await jobs.submit(stranger, "ns", DEF, namespace="mine")
    assert (await read(owner, "ns", jid)).namespaces == ("mine", "owned")
    state = await jobs.cancel(stranger, "ns", jid, namespace="*")
    assert state.state == "queued" and state.namespaces == ("owned",)
    # the submitter may remove any namespace
    await jobs.submit(stranger, "ns", DEF, namespace="mine")
    state = await jobs.cancel(owner, "ns", jid, namespace="mine")
    assert state.namespaces == ("owned",)


async def test_two_live_jobs_in_one_namespace_the_older_ends_replaced(make_log: MakeLog) -> None:
    client, worker = await make_log(), await make_log()
    older = await namespaces.submit(client, "ns", definition(1), namespace="editor")
    lease = await claim_job(worker, "ns", older.job_id)
    await lease.start()
    # the same older job is also held for another namespace, and by another key for this one
    other_key = await make_log()
    shared = await namespaces.submit(client, "ns", definition(2), namespace="editor")
    await jobs.submit(client, "ns", definition(2), namespace="elsewhere")
    await jobs.submit(other_key, "ns", definition(2), namespace="editor")

    newer = await namespaces.submit(client, "ns", definition(3), namespace="editor")
    assert {(r.job_id, r.delay_ms) for r in newer.replacing} == {
        (older.job_id, 0),  # young jobs are replaced at once (compute-queues)
        (shared.job_id, 0),
    }
    ended, kept = await namespaces.replace_now(client, newer.replacing)

    # the running one: its worker is asked to stop, and its result says why
    assert ended is not None and ended.cancel_requested and ended.namespaces == ()
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.reason == "cancelled"
    assert done.result is not None and done.result.replaced_by == newer.job_id
    assert done.cq_state == ("Finished", "JobReplacedByClient")
    # the one other namespaces still hold goes on
    assert kept is not None and kept.state == "queued"
    assert {(h.namespace, h.key) for h in kept.holds} == {
        ("elsewhere", client.peer_id),
        ("editor", other_key.peer_id),
    }
    state = await read(client, "ns", newer.job_id)
    assert state.state == "queued" and state.namespaces == ("editor",)


async def test_concurrent_submissions_in_one_namespace_leave_exactly_one(
    make_log: MakeLog,
) -> None:
    client = await make_log()
    subs = await asyncio.gather(
        *(namespaces.submit(client, "race", definition(n), namespace="n") for n in range(4))
    )
    await namespaces.replace_now(client, [r for s in subs for r in s.replacing])
    live = await namespaces.live_jobs(client, "race")
    assert len(live) == 1, [(s.job_id[:8], s.namespaces) for s in live]
    newest = max(subs, key=lambda s: s.hold.seq if s.hold else 0)
    assert live[0].job_id == newest.job_id
    for s in subs:
        if s.job_id != newest.job_id:
            assert (await read(client, "race", s.job_id)).cq_state[1] == "JobReplacedByClient"


async def test_resubmitting_an_older_job_makes_it_the_newest_again(make_log: MakeLog) -> None:
    client = await make_log()
    first = await namespaces.submit(client, "ns", definition(1), namespace="n")
    second = await namespaces.submit(client, "ns", definition(2), namespace="n")
    await namespaces.replace_now(client, second.replacing)
    assert (await read(client, "ns", first.job_id)).reason == "cancelled"
    # the user goes back to the first: it runs again, and the second is replaced
    again = await namespaces.submit(client, "ns", definition(1), namespace="n")
    assert again.requeued and [r.job_id for r in again.replacing] == [second.job_id]
    await namespaces.replace_now(client, again.replacing)
    assert (await read(client, "ns", second.job_id)).cq_state[1] == "JobReplacedByClient"
    state = await read(client, "ns", first.job_id)
    assert state.state == "queued" and state.namespaces == ("n",)


async def test_the_default_namespace_replaces_nothing(make_log: MakeLog) -> None:
    client = await make_log()
    for n in range(3):
        sub = await namespaces.submit(client, "ns", definition(n))
        assert sub.replacing == () and sub.namespace == "_"
    assert len(await namespaces.live_jobs(client, "ns")) == 3


def test_the_grace_is_compute_queues_by_age() -> None:
    grace = namespaces.DEFAULT_GRACE
    assert [grace.delay_ms(age) for age in (0, 20_000, 20_001, 60_000, 60_001, 10**9)] == [
        0,
        0,
        4_000,
        4_000,
        8_000,
        8_000,
    ]


async def test_a_replaced_job_is_released_after_its_grace_in_server_time(
    make_log: MakeLog,
) -> None:
    client = await make_log()
    grace = namespaces.ReplaceGrace(((0, 1_500),))  # any age: 1.5 s
    older = await namespaces.submit(client, "g", definition(1), namespace="n", grace=grace)
    newer = await namespaces.submit(client, "g", definition(2), namespace="n", grace=grace)
    assert [(r.job_id, r.delay_ms) for r in newer.replacing] == [(older.job_id, 1_500)]
    (ended,) = await namespaces.replace_now(client, newer.replacing)
    assert ended is not None and ended.cq_state == ("Finished", "JobReplacedByClient")
    # the release landed at least the grace after the newer job's hold, as the server says
    held = await client.read_subject(subjects.JOBS_STREAM, subjects.job_subject("g", newer.job_id))
    released = await client.read_subject(
        subjects.JOBS_STREAM, subjects.job_subject("g", older.job_id)
    )
    assert held[0].ts is not None and released[-1].ts is not None
    assert released[-1].ts - held[0].ts >= 1_500


async def test_a_bad_namespace_is_refused_with_what_is_wrong(make_log: MakeLog) -> None:
    client = await make_log()
    for bad, says in (("", "1 to 256"), ("x" * 257, "1 to 256"), ("a\nb", "control"), ("*", "'*'")):
        with pytest.raises(InvalidInput, match=says):
            await jobs.submit(client, "ns", DEF, namespace=bad)
