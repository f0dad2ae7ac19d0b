"""Events signed by the submitter's own key through the gateway (issue 14, item 4).

The gateway prepares the exact bytes to sign, the client (the page's browser, here a Python
key) signs them, and the gateway checks the envelope as any reader would and appends it by
compare-and-set. Then the job is the key's: only it may cancel it. Real gateway and
nats-server; the forged commits are built with the wire module, as an attacker would.
"""

from __future__ import annotations

import base64
from typing import Any

from gatewaystack import IMAGE, Gateway, Stack, replace_limits

from asman.log import jobs, subjects, wire
from asman.log.connection import Log
from asman.log.definition import job_id
from asman.log.events import now_ms
from asman.log.keys import PeerKey

API = "/api/v1/queues"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signed(key: PeerKey, subject: str, event: dict[str, Any]) -> dict[str, str]:
    """A commit body: ``event`` signed by ``key`` for ``subject`` (as an attacker builds it)."""
    unsigned = wire.to_sign(key.public_bytes, subject, event)
    return {
        "protected": b64(unsigned.protected),
        "payload": b64(unsigned.payload),
        "signature": b64(key.sign(unsigned.data)),
    }


class KeyedClient:
    """An HTTP client with its own Ed25519 key, signing what the gateway prepares."""

    def __init__(self, gw: Gateway, key: PeerKey | None = None) -> None:
        self.gw = gw
        self.key = key or PeerKey.generate()

    async def prepare_submit(self, queue: str, definition: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.gw.json(
            "POST",
            f"{API}/{queue}/jobs/prepare",
            json={"definition": definition, "key": self.key.peer_id},
        )
        assert status == 200, body
        return dict(body)

    async def prepare_cancel(self, queue: str, job: str) -> tuple[int, Any]:
        return await self.gw.json(
            "POST",
            f"{API}/{queue}/jobs/{job}/cancel/prepare",
            json={"key": self.key.peer_id, "message": "mine"},
        )

    async def commit(self, prepared: dict[str, Any], signer: PeerKey | None = None) -> Any:
        signature = (signer or self.key).sign(unb64(prepared["toSign"]))
        return await self.gw.json(
            "POST",
            prepared["commit"],
            json={
                "protected": prepared["protected"],
                "payload": prepared["payload"],
                "signature": b64(signature),
            },
        )

    async def submit(self, queue: str, definition: dict[str, Any]) -> tuple[int, Any]:
        return await self.commit(await self.prepare_submit(queue, definition))

    async def cancel(self, queue: str, job: str) -> tuple[int, Any]:
        status, prepared = await self.prepare_cancel(queue, job)
        if status != 200:
            return status, prepared
        return await self.commit(prepared)


async def last_seq(peer: Log, queue: str, job: str) -> int:
    return await peer.last_seq(subjects.JOBS_STREAM, subjects.job_subject(queue, job))


async def test_a_job_submitted_with_a_key_is_that_keys_to_cancel(
    stack: Stack, gateway: Gateway
) -> None:
    peer = await stack.peer()
    owner, stranger = KeyedClient(gateway), KeyedClient(gateway)
    definition = {"image": IMAGE, "command": "echo mine"}
    status, job = await owner.submit("keyed", definition)
    assert status == 201, job
    jid = job["jobId"]
    assert jid == job_id(definition) and job["state"] == "queued" and job["created"]

    # on the log: the submitter is the client's key, not the gateway's; it came through it
    _, info = await gateway.json("GET", "/api/v1/info")
    state = await jobs.read_job(peer, "keyed", jid)
    assert state is not None
    assert state.submitter == owner.key.peer_id != info["peerId"]
    assert state.via == info["name"] and state.rejected == 0

    # a client without a key (the gateway signs) may not cancel it
    before = await last_seq(peer, "keyed", jid)
    status, body = await gateway.json("POST", f"{API}/keyed/jobs/{jid}/cancel")
    assert status == 403 and body["code"] == "forbidden", body
    # nor may another key: refused before anything is signed
    status, body = await stranger.cancel("keyed", jid)
    assert status == 403 and "belongs to another key" in body["error"], body
    assert owner.key.peer_id[:12] in body["error"] and stranger.key.peer_id[:12] in body["error"]
    assert await last_seq(peer, "keyed", jid) == before
    assert (await gateway.json("GET", f"{API}/keyed/jobs/{jid}"))[1]["state"] == "queued"

    # its own key may
    status, job = await owner.cancel("keyed", jid)
    assert status == 200, job
    assert job["state"] == "finished" and job["reason"] == "cancelled"
    state = await jobs.read_job(peer, "keyed", jid)
    assert state is not None and state.reason == "cancelled"
    assert state.history[-1].type == "cancel" and state.history[-1].signer == owner.key.peer_id

    # submitting the same job again with the key: the job is served as it is
    status, again = await owner.submit("keyed", definition)
    assert status in (200, 201), again
    assert again["jobId"] == jid


async def test_without_a_key_the_gateway_signs_as_before(gateway: Gateway, stack: Stack) -> None:
    peer = await stack.peer()
    definition = {"image": IMAGE, "command": "echo plain"}
    status, job = await gateway.json("POST", f"{API}/plain/jobs", json={"definition": definition})
    assert status == 201
    _, info = await gateway.json("GET", "/api/v1/info")
    assert job["submitter"] == info["peerId"]
    status, job = await gateway.json("POST", f"{API}/plain/jobs/{job['jobId']}/cancel")
    assert status == 200 and job["reason"] == "cancelled"
    state = await jobs.read_job(peer, "plain", job["jobId"])
    assert state is not None and state.submitter == info["peerId"]


async def test_a_cancel_prepared_before_the_job_moved_is_refused_with_409(
    stack: Stack, gateway: Gateway
) -> None:
    peer = await stack.peer()
    owner = KeyedClient(gateway)
    status, job = await owner.submit("moved", {"image": IMAGE, "command": "echo moved"})
    assert status == 201
    jid = job["jobId"]
    status, prepared = await owner.prepare_cancel("moved", jid)
    assert status == 200, prepared
    # the job's subject moves on (a message of a stranger: ignored by readers, but it is there)
    subject = subjects.job_subject("moved", jid)
    await peer.append(subject, {"type": "note"}, expected_last_seq=job["seq"])
    moved = await last_seq(peer, "moved", jid)
    status, body = await owner.commit(prepared)
    assert status == 409 and body["code"] == "conflict", body
    assert "prepare" in body["error"]
    assert await last_seq(peer, "moved", jid) == moved
    # a fresh prepare works
    status, job = await owner.cancel("moved", jid)
    assert status == 200 and job["reason"] == "cancelled", job


async def test_forged_commits_get_a_clear_4xx_and_write_nothing(
    stack: Stack, busybox_image: str
) -> None:
    limits = replace_limits(max_definition_bytes=2048)
    gateway = await stack.gateway(limits=limits)
    peer = await stack.peer()
    _, info = await gateway.json("GET", "/api/v1/info")
    victim, attacker = KeyedClient(gateway), KeyedClient(gateway)
    queue = "forged"
    mine = {"image": IMAGE, "command": "echo victim"}
    status, job = await victim.submit(queue, mine)
    assert status == 201
    victim_job = job["jobId"]
    victim_seq = await last_seq(peer, queue, victim_job)

    async def refused(
        path: str, body: Any, status: int, code: str, words: str, job: str
    ) -> dict[str, Any]:
        before = await last_seq(peer, queue, job)
        got, answer = await gateway.json("POST", path, json=body)
        assert got == status and answer["code"] == code, answer
        assert words in answer["error"], answer
        assert "\n" not in answer["error"]
        assert await last_seq(peer, queue, job) == before
        return dict(answer)

    # 1. signed by the attacker, under the victim's kid: the signature does not verify
    other = {"image": IMAGE, "command": "echo forged"}
    prepared = await victim.prepare_submit(queue, other)
    forged = unb64(prepared["toSign"])
    body = {
        "protected": prepared["protected"],
        "payload": prepared["payload"],
        "signature": b64(attacker.key.sign(forged)),
    }
    await refused(
        prepared["commit"], body, 400, "bad_signature", "does not verify", prepared["jobId"]
    )
    assert await last_seq(peer, queue, prepared["jobId"]) == 0

    # the victim's cancel, signed by the attacker under the victim's kid
    status, cancel = await victim.prepare_cancel(queue, victim_job)
    assert status == 200
    body = {
        "protected": cancel["protected"],
        "payload": cancel["payload"],
        "signature": b64(attacker.key.sign(unb64(cancel["toSign"]))),
    }
    await refused(cancel["commit"], body, 400, "bad_signature", "does not verify", victim_job)

    # 2. a payload (well signed) for another job, sent to the victim's job
    prepared = await attacker.prepare_submit(queue, other)
    signature = attacker.key.sign(unb64(prepared["toSign"]))
    body = {
        "protected": prepared["protected"],
        "payload": prepared["payload"],
        "signature": b64(signature),
    }
    path = f"{API}/{queue}/jobs/{victim_job}/signed"
    await refused(path, body, 400, "invalid_envelope", "another subject", victim_job)
    # ... and signed for the victim's subject, with the other job's definition
    subject = subjects.job_subject(queue, victim_job)
    event = dict(prepared["event"])
    await refused(
        path,
        signed(attacker.key, subject, event),
        400,
        "invalid_input",
        "hashes to job",
        victim_job,
    )

    # 3. event types other than submitted and cancel, well signed by the victim itself
    for kind in ("finished", "requeued", "claimed"):
        body = signed(
            victim.key,
            subject,
            {"type": kind, "ts": now_ms(), "reason": "success", "prev": victim_seq},
        )
        await refused(path, body, 400, "invalid_input", "submitted or cancel", victim_job)

    # 4. a definition over the gateway's limits (2 KiB here), well signed
    big = {"image": IMAGE, "command": "echo " + "x" * 4096}
    big_id = job_id(big)
    big_subject = subjects.job_subject(queue, big_id)
    event = {
        "type": "submitted",
        "ts": now_ms(),
        "definition": jobs.definition_text(big),
        "class": "cpu",
        "via": info["name"],
        "prev": 0,
    }
    await refused(
        f"{API}/{queue}/jobs/{big_id}/signed",
        signed(attacker.key, big_subject, event),
        400,
        "invalid_definition",
        "limit",
        big_id,
    )
    # the prepare refuses it too
    status, answer = await gateway.json(
        "POST",
        f"{API}/{queue}/jobs/prepare",
        json={"definition": big, "key": attacker.key.peer_id},
    )
    assert status == 400 and answer["code"] == "invalid_definition", answer

    # 5. a submission that is not the one this gateway would append
    prepared = await attacker.prepare_submit(queue, other)
    other_subject = subjects.job_subject(queue, prepared["jobId"])
    other_path = f"{API}/{queue}/jobs/{prepared['jobId']}/signed"
    changes: list[tuple[dict[str, Any], int, str, str]] = [
        ({"via": "another-gateway"}, 400, "invalid_input", "via"),
        ({"class": "gpu"}, 400, "invalid_input", "class"),
        ({"extra": "field"}, 400, "invalid_input", "extra"),
        ({"v": 3}, 400, "invalid_input", "'v'"),
        ({"ts": now_ms() - 3_600_000}, 400, "invalid_input", "ts"),
        ({"ts": "now"}, 400, "invalid_input", "ts"),
        ({"prev": 7}, 409, "conflict", "prepare"),
        ({"prev": "0"}, 400, "invalid_input", "prev"),
    ]
    for change, status, code, words in changes:
        body = signed(attacker.key, other_subject, {**prepared["event"], **change})
        await refused(other_path, body, status, code, words, prepared["jobId"])
    # a cancel with a field the gateway does not write
    cancel_event = {"type": "cancel", "ts": now_ms(), "message": "x", "prev": victim_seq}
    body = signed(victim.key, subject, {**cancel_event, "force": True})
    await refused(path, body, 400, "invalid_input", "force", victim_job)

    # 6. bodies that are not an envelope's parts
    good = signed(victim.key, subject, cancel_event)
    bad_bodies: list[tuple[Any, str, str]] = [
        ({**good, "protected": "!!"}, "invalid_input", "base64url"),
        ({**good, "payload": 7}, "invalid_input", "base64url"),
        (
            {"protected": good["protected"], "payload": good["payload"]},
            "invalid_input",
            "signature",
        ),
        ({**good, "signature": b64(b"short")}, "invalid_envelope", "64"),
        ({**good, "more": 1}, "invalid_input", "unknown"),
        ([], "invalid_input", "object"),
    ]
    for bad, code, words in bad_bodies:
        await refused(path, bad, 400, code, words, victim_job)
    # the prepare routes check their keys
    for key in ("", "ab" * 31, "AB" * 32, 7):
        status, answer = await gateway.json(
            "POST", f"{API}/{queue}/jobs/prepare", json={"definition": other, "key": key}
        )
        assert status == 400 and "key" in answer["error"], answer

    # nothing of all that reached the log: the victim's job is as it was, and its own
    # signed cancel still works
    state = await jobs.read_job(peer, queue, victim_job)
    assert state is not None and state.state == "queued" and state.rejected == 0
    status, job = await victim.cancel(queue, victim_job)
    assert status == 200 and job["reason"] == "cancelled", job
