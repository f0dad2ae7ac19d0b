"""Queue policies against a stranger with a key of its own, on a real nats-server.

Each test is one attack or one promise of issue 14: a policy nobody but the queue's owner can
start, changed only by its admins; untrusted claims, results and hoarded jobs count for
nothing while a trusted worker completes the job; a revoked worker's job is handed on.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from adversary import Attacker, MakeLog, claim_waiting

from asman.errors import InvalidInput, LeaseLost, UnauthorizedSigner
from asman.log import jobs, queues, subjects, wire
from asman.log.definition import job_id
from asman.log.events import now_ms
from asman.log.keys import PeerKey
from asman.log.leases import claim
from asman.log.policy import (
    Ceilings,
    Policy,
    is_owner_bound,
    make_cert,
    new_private_queue,
    owner_matches,
)
from asman.peer.dispatch import Dispatcher

DEF = {"image": "asman/busybox:local", "command": "echo policy"}


def private(owner: str, **fields: object) -> Policy:
    """A policy: only ``owner`` submits and works unless ``fields`` say otherwise."""
    return dataclasses.replace(Policy.private("", owner), **fields)  # type: ignore[arg-type]


def policy_event(version: int, **fields: object) -> dict[str, object]:
    body = Policy(queue="", version=version, owner="", signer="", **fields).to_event()  # type: ignore[arg-type]
    return {**body, "ts": now_ms()}


def test_a_private_name_is_bound_to_its_owner() -> None:
    owner, other = PeerKey.generate().peer_id, PeerKey.generate().peer_id
    name = new_private_queue(owner)
    subjects.validate_queue(name)
    assert is_owner_bound(name) and owner_matches(name, owner)
    assert not owner_matches(name, other)
    assert not is_owner_bound("abcdefghijklmnopqrstuvwxyz")  # `asman queue new`
    assert new_private_queue(owner) != name  # random: two queues of one owner are unlinked


async def test_a_stranger_cannot_put_a_policy_on_an_open_queue(
    make_log: MakeLog, attacker: Attacker
) -> None:
    """Squatting: the first writer of a policy on an open queue would own it."""
    user = await make_log()
    queue = "openqueue"
    subject = subjects.policy_subject(queue)
    await attacker.sign_on_top(subject, policy_event(1, workers=frozenset({attacker.key.peer_id})))
    assert await queues.read_policy(user, queue) is None
    with pytest.raises(InvalidInput, match="open queue"):
        await queues.write_policy(await make_log(), queue, lambda _: private(""))
    # anyone still works for it, and the policy subject is no job in its listing
    sub = await jobs.submit(user, queue, DEF)
    lease = await claim_waiting(await make_log(), queue)
    await lease.finish({"reason": "success", "exit_code": 0})
    listed = await jobs.list_jobs(user, queue)
    assert [s.job_id for s in listed] == [sub.job_id] and listed[0].reason == "success"


async def test_only_the_owner_writes_the_first_version_and_only_admins_change_it(
    make_log: MakeLog, attacker: Attacker
) -> None:
    owner = await make_log()
    queue = new_private_queue(owner.peer_id)
    subject = subjects.policy_subject(queue)
    # the stranger races the owner to the first version
    await attacker.sign_on_top(subject, policy_event(1, workers=frozenset()))
    assert (await queues.read_policy(owner, queue)).current is None  # type: ignore[union-attr]
    written = await queues.write_policy(owner, queue, lambda _: private(owner.peer_id))
    assert written.version == 1 and written.owner == owner.peer_id

    # a change by a non-admin: ignored on the log, refused by the tools
    await attacker.sign_on_top(
        subject, policy_event(2, workers=None, admins=frozenset({attacker.key.peer_id}))
    )
    view = await queues.read_policy(owner, queue)
    assert view is not None and view.version == 1 and view.current == written
    stranger = await make_log()
    with pytest.raises(UnauthorizedSigner, match="not an admin"):
        await queues.write_policy(stranger, queue, lambda p: p or private(""))

    # an admin named by the owner may change it
    admin = await make_log()
    await queues.write_policy(
        owner, queue, lambda p: dataclasses.replace(p, admins=frozenset({admin.peer_id}))
    )
    v3 = await queues.write_policy(admin, queue, lambda p: dataclasses.replace(p, workers=None))
    assert v3.version == 3 and v3.workers is None and v3.signer == admin.peer_id


async def test_untrusted_claims_and_results_are_ignored_while_a_trusted_worker_completes(
    make_log: MakeLog, attacker: Attacker
) -> None:
    owner, trusted, untrusted = await make_log(), await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(
        owner,
        queue,
        lambda _: private(owner.peer_id, workers=frozenset({trusted.peer_id})),
    )
    sub = await jobs.submit(owner, queue, DEF)
    subject = subjects.job_subject(queue, sub.job_id)

    # an untrusted Asman worker gets nothing; a raw client's claim and result are ignored
    assert await claim(untrusted, queue, sub.job_id) is None
    await attacker.sign_on_top(subject, {"type": "claimed", "proc": "1"})
    fake = {"path": "out.txt", "size": 4, "sha256": "0" * 64, "data": b"FAKE"}
    await attacker.sign_on_top(
        subject,
        {"type": "finished", "reason": "success", "attempt": 1, "proc": "1", "outputs": [fake]},
    )
    state = await jobs.read_job(owner, queue, sub.job_id)
    assert state is not None and state.state == "queued" and state.rejected == 2
    assert any("policy does not trust" in h.note for h in state.history)

    lease = await claim_waiting(trusted, queue)
    await lease.start()
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == trusted.peer_id
    assert done.result.outputs == ()


async def test_a_hoarder_holds_no_job(make_log: MakeLog, attacker: Attacker) -> None:
    """A raw client claims every job and says in the index that it runs them; the trusted
    worker's dispatcher takes them anyway."""
    owner, trusted = await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(
        owner, queue, lambda _: private(owner.peer_id, workers=frozenset({trusted.peer_id}))
    )
    sub = await jobs.submit(owner, queue, DEF)
    subject = subjects.job_subject(queue, sub.job_id)
    seq = await attacker.sign_on_top(subject, {"type": "claimed", "proc": "1"})
    hoarded = wire.running_entry(seq, attacker.key.peer_id, "1")
    await attacker.js.publish(subjects.waiting_subject(queue, "cpu", sub.job_id), hoarded)

    dispatcher = await Dispatcher(trusted, (queue,)).open()
    try:
        stopping = asyncio.Event()
        async with asyncio.timeout(10):
            cand = await dispatcher.next(stopping, lambda _: True)
    finally:
        await dispatcher.close()
    assert cand is not None and cand.job_id == sub.job_id
    lease = await claim(trusted, queue, cand.job_id, cand.entry.seq)
    assert lease is not None and lease.state.lease is not None
    assert lease.state.lease.worker == trusted.peer_id


async def test_revoking_a_worker_mid_job_hands_its_job_on(make_log: MakeLog) -> None:
    owner, first, second = await make_log(), await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    both = frozenset({first.peer_id, second.peer_id})
    await queues.write_policy(owner, queue, lambda _: private(owner.peer_id, workers=both))
    sub = await jobs.submit(owner, queue, DEF)
    lease = await claim_waiting(first, queue)
    await lease.start()

    await queues.write_policy(
        owner, queue, lambda p: dataclasses.replace(p, workers=frozenset({second.peer_id}))
    )
    state = await jobs.read_job(owner, queue, sub.job_id)
    assert state is not None and state.state == "queued" and state.lease is None
    with pytest.raises(LeaseLost):
        await lease.check()
    with pytest.raises(LeaseLost):
        await lease.finish({"reason": "success", "exit_code": 0, "message": "revoked"})
    again = await claim(second, queue, sub.job_id)
    assert again is not None
    done = await again.finish({"reason": "success", "exit_code": 0, "message": "trusted"})
    assert done.result is not None and done.result.worker == second.peer_id


async def test_a_result_written_while_trusted_stays_after_revocation(make_log: MakeLog) -> None:
    owner, worker = await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(owner, queue, lambda _: private(owner.peer_id, workers=None))
    sub = await jobs.submit(owner, queue, DEF)
    lease = await claim_waiting(worker, queue)
    await lease.finish({"reason": "success", "exit_code": 0})
    await queues.write_policy(
        owner, queue, lambda p: dataclasses.replace(p, workers=frozenset({owner.peer_id}))
    )
    state = await jobs.read_job(owner, queue, sub.job_id)
    assert state is not None and state.reason == "success"  # not run again


async def test_certified_workers_count_and_others_do_not(make_log: MakeLog) -> None:
    owner, certified, expired, plain = [await make_log() for _ in range(4)]
    institution = PeerKey.generate()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(
        owner,
        queue,
        lambda _: private(
            owner.peer_id, workers=frozenset(), certifiers=frozenset({institution.peer_id})
        ),
    )
    certified.cert = make_cert(institution, certified.peer_id, now_ms() + 3_600_000)
    expired.cert = make_cert(institution, expired.peer_id, now_ms() - 1)
    plain.cert = make_cert(PeerKey.generate(), plain.peer_id, now_ms() + 3_600_000)
    sub = await jobs.submit(owner, queue, DEF)
    assert await claim(expired, queue, sub.job_id) is None
    assert await claim(plain, queue, sub.job_id) is None
    lease = await claim(certified, queue, sub.job_id)
    assert lease is not None
    done = await lease.finish({"reason": "success", "exit_code": 0})
    assert done.result is not None and done.result.worker == certified.peer_id


async def test_submitters_ceilings_and_admin_cancel(make_log: MakeLog, attacker: Attacker) -> None:
    owner, stranger, admin = await make_log(), await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    ceilings = Ceilings(max_duration_ms=60_000, images=("asman/*",))
    await queues.write_policy(
        owner,
        queue,
        lambda _: private(owner.peer_id, ceilings=ceilings, admins=frozenset({admin.peer_id})),
    )
    ok = {**DEF, "maxDuration": "30s"}
    with pytest.raises(UnauthorizedSigner, match="lets only listed keys submit"):
        await jobs.submit(stranger, queue, ok)
    with pytest.raises(InvalidInput, match="maxDuration must be set"):
        await jobs.submit(owner, queue, DEF)
    with pytest.raises(InvalidInput, match="not allowed by this queue's policy"):
        await jobs.submit(owner, queue, {**ok, "image": "evil/miner"})
    # a raw submission by the stranger does not make a job
    evil = {**ok, "command": "echo stranger"}
    await attacker.sign_on_top(
        subjects.job_subject(queue, job_id(evil)),
        {"type": "submitted", "definition": jobs.definition_text(evil), "class": "cpu"},
    )
    assert await jobs.read_job(owner, queue, job_id(evil)) is None

    sub = await jobs.submit(owner, queue, ok)
    with pytest.raises(UnauthorizedSigner, match="or an admin of its queue"):
        await jobs.cancel(stranger, queue, sub.job_id)
    cancelled = await jobs.cancel(admin, queue, sub.job_id)
    assert cancelled.reason == "cancelled"


async def test_the_policy_outlives_the_retention_of_jobs(
    make_log: MakeLog, attacker: Attacker
) -> None:
    """Written with ``Nats-TTL: never`` on a stream that allows per-message TTLs: the
    server keeps it past the jobs' max age, so a queue never falls back to open."""
    owner = await make_log(retention_s=60)
    queue = new_private_queue(owner.peer_id)
    written = await queues.write_policy(owner, queue, lambda _: private(owner.peer_id))
    info = await attacker.js.stream_info(subjects.JOBS_STREAM)
    assert info.config.allow_msg_ttl and info.config.max_age == 60
    msg = await attacker.js.get_msg(subjects.JOBS_STREAM, seq=written.seq)
    assert (msg.headers or {}).get(subjects.HDR_TTL) == "never"


async def test_an_untrusted_worker_is_told_what_to_ask(make_log: MakeLog) -> None:
    owner, worker = await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(owner, queue, lambda _: private(owner.peer_id))
    dispatcher = await Dispatcher(worker, (queue,)).open()
    try:
        why = dispatcher.refused[queue]
        assert f"asman queue trust {queue} {worker.peer_id}" in why and "\n" not in why
        await queues.write_policy(
            owner,
            queue,
            lambda p: dataclasses.replace(p, workers=frozenset({worker.peer_id})),
        )
        async with asyncio.timeout(10):
            while queue in dispatcher.refused:
                await dispatcher.wake.wait()  # the policy subject wakes the dispatcher
                dispatcher.wake.clear()
                await dispatcher.check_policies()
    finally:
        await dispatcher.close()


async def test_results_past_the_queue_retention_are_unlisted_and_run_again(
    make_log: MakeLog,
) -> None:
    owner, worker, other = await make_log(), await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(
        owner,
        queue,
        lambda _: private(owner.peer_id, submitters=None, workers=None, retention_ms=60_000),
    )
    sub = await jobs.submit(owner, queue, DEF)
    lease = await claim_waiting(worker, queue)
    # a result from two minutes ago (its time is the worker's)
    old = {"type": "finished", "reason": "success", "exit_code": 0, "attempt": lease.attempt}
    await worker.append(
        lease.subject,
        {**old, "proc": worker.session, "ts": now_ms() - 120_000},
        expected_last_seq=lease.last_seq,
    )
    state = await jobs.read_job(owner, queue, sub.job_id)
    assert state is not None and state.reason == "success"
    assert await jobs.list_jobs(owner, queue) == []
    again = await jobs.submit(other, queue, DEF)  # not the submitter, yet it runs again
    assert again.requeued and again.state.state == "queued"


async def test_the_queue_lease_ttl_is_the_one_holders_and_challengers_use(
    make_log: MakeLog,
) -> None:
    owner, worker = await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    await queues.write_policy(
        owner, queue, lambda _: private(owner.peer_id, workers=None, lease_ms=1_500)
    )
    assert owner.rules.lease_ms == 30_000  # the deployment's
    await jobs.submit(owner, queue, DEF)
    lease = await claim_waiting(worker, queue)
    assert lease.history.rules.lease_ms == 1_500  # what its watch answers challenges within


async def test_a_queue_watcher_sees_a_revoked_workers_job_go_back(make_log: MakeLog) -> None:
    """``watch_queue`` (``asman watch``) folds the queue's jobs once; a new policy version
    folds them again, so a job whose worker was revoked shows as queued."""
    owner, worker = await make_log(), await make_log()
    queue = new_private_queue(owner.peer_id)
    trusted = frozenset({worker.peer_id})
    await queues.write_policy(owner, queue, lambda _: private(owner.peer_id, workers=trusted))
    sub = await jobs.submit(owner, queue, DEF)
    lease = await claim_waiting(worker, queue)
    await lease.start()
    seen = []
    async with asyncio.timeout(20):
        async for state in jobs.watch_queue(owner, queue):
            seen.append(state.state)
            if state.state == "running" and seen.count("running") == 1:
                await queues.write_policy(
                    owner, queue, lambda p: dataclasses.replace(p, workers=frozenset())
                )
            if state.job_id == sub.job_id and state.state == "queued" and "running" in seen:
                break
    assert seen[-2:] == ["running", "queued"]
