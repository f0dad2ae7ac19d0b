"""Callbacks (webhooks): compute-queues' ``submit_job_post`` and ``webhooks`` functional cases
(reference/compute-queues.md §8) rewritten against Asman's routes, with a real gateway, a
real worker and Docker, and a webhook receiver on 127.0.0.1 (``receiver.py``) that verifies
each signature with the code docs/guide.md gives receivers."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from faults import Cli
from gatewaystack import IMAGE, Gateway, Stack
from receiver import Receiver, guide_function

from asman.log.keys import PeerKey
from asman.peer.callbacks import CallbackSender, CallbackSettings

QUEUE = "hooks"
#: retries a tenth of a second apart, so a receiver that fails twice is served at once
FAST = CallbackSettings(first_delay_s=0.1, max_delay_s=0.5, window_s=60, grace_s=5)

verify_asman_callback = guide_function("verify_asman_callback")
sent_by_the_job_peer = guide_function("sent_by_the_job_peer")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = await Receiver().start()
    try:
        yield r
    finally:
        await r.close()


class Refusals(logging.Handler):
    """The callback senders' "not sent" lines, each setting an event: a refusal is waited
    for, never slept on."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []
        self.seen: dict[str, asyncio.Event] = {
            "queued": asyncio.Event(),
            "finished": asyncio.Event(),
        }
        self.loop = asyncio.get_running_loop()

    def emit(self, record: logging.LogRecord) -> None:
        line = record.getMessage()
        self.lines.append(line)
        for event, flag in self.seen.items():
            if line.startswith(f"callback {event} ") and " not sent: " in line:
                self.loop.call_soon_threadsafe(flag.set)


@pytest.fixture
async def refusals() -> AsyncIterator[Refusals]:
    handler = Refusals()
    logger = logging.getLogger("asman.peer.callbacks")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def gateway_key(gw: Gateway) -> str:
    status, info = await gw.json("GET", "/api/v1/info")
    assert status == 200, info
    return str(info["peerId"])


async def test_submit_job_post_the_queued_callback_is_retried_until_delivered(
    stack: Stack,
) -> None:
    """compute-queues' submit_job_post_test: a REST POST with a namespace and a queued
    callback; the receiver gets {jobId, queue, namespace, config}. Here the receiver keeps
    the first attempt waiting until the submission was answered (the answer never waits for
    the callback), then fails twice: the callback still arrives, retried."""
    hold = asyncio.Event()
    receiver = await Receiver(failures=(500, 503), hold=hold).start()
    try:
        gw = await stack.gateway(allow_urls=("127.0.0.1",), callbacks=FAST)
        namespace = f"test{secrets.randbelow(1_000_000)}"
        payload = {"we": "are good"}
        definition = {"image": IMAGE, "command": f"echo {secrets.randbelow(1_000_000)}"}
        enqueue = {
            "definition": definition,
            "control": {
                "namespace": namespace,
                "callbacks": {"queued": {"url": receiver.url("/test"), "payload": payload}},
            },
        }
        status, body = await gw.json("POST", f"/q/{QUEUE}", json=enqueue)
        assert status == 200, body
        assert body["success"] is True
        hold.set()  # answered while the callback's first attempt may still be waiting

        call = await receiver.delivered("/test")
        assert call.json == {
            "event": "queued",
            "jobId": body["jobId"],
            "queue": QUEUE,
            "namespace": namespace,
            "config": payload,
        }
        tries = receiver.attempts("/test")
        assert [c.status for c in tries] == [500, 503, 200]
        assert len({c.headers["webhook-id"] for c in tries}) == 1  # one delivery, retried

        key = verify_asman_callback(call.headers, call.body)
        assert key == await gateway_key(gw)
        assert await asyncio.to_thread(sent_by_the_job_peer, gw.url, call.json, key)
        # a forged body does not verify with the same headers
        with pytest.raises(ValueError, match="signature"):
            verify_asman_callback(call.headers, call.body.replace(b"test", b"tost"))
        # the control went with the job and is not part of it
        status, job = await gw.json("GET", f"/api/v1/queues/{QUEUE}/jobs/{body['jobId']}")
        assert job["control"] == enqueue["control"] and job["definition"] == definition
        status, plain = await gw.json("POST", "/api/v1/validate", json={"definition": definition})
        assert plain["jobId"] == body["jobId"]
    finally:
        await receiver.close()


@pytest.mark.docker
async def test_webhooks_queued_and_finished_signed_by_who_did_it(
    stack: Stack, busybox_image: str, receiver: Receiver
) -> None:
    """compute-queues' webhooks_test, and the finished callback compute-queues never sends:
    the worker that wrote the result sends it, with the state, reason and exit code."""
    gw = await stack.gateway(allow_urls=("127.0.0.1",), callbacks=FAST)
    worker = await stack.worker(QUEUE, callbacks=FAST)  # allows 127.0.0.1, as `asman dev`
    control = {
        "callbacks": {
            "queued": {"url": receiver.url("/queued")},
            "finished": {"url": receiver.url("/finished"), "payload": {"run": 7}},
        }
    }
    definition = {"image": IMAGE, "command": "sh -c 'echo out; exit 3'"}
    status, body = await gw.json(
        "POST", f"/api/v1/queues/{QUEUE}/jobs", json={"definition": definition, "control": control}
    )
    assert status == 201, body
    jid = body["jobId"]

    queued = await receiver.delivered("/queued")
    assert queued.json == {
        "event": "queued",
        "jobId": jid,
        "queue": QUEUE,
        "namespace": "_",
        "config": {},
    }
    assert verify_asman_callback(queued.headers, queued.body) == await gateway_key(gw)

    finished = await receiver.delivered("/finished")
    got = finished.json
    assert {k: got[k] for k in ("event", "jobId", "queue", "namespace", "config")} == {
        "event": "finished",
        "jobId": jid,
        "queue": QUEUE,
        "namespace": "_",
        "config": {"run": 7},
    }
    # compute-queues' names (a non-zero exit is still Success there) and Asman's
    assert (got["state"], got["finishedReason"]) == ("Finished", "Success")
    assert (got["reason"], got["exitCode"]) == ("failed", 3)
    key = verify_asman_callback(finished.headers, finished.body)
    assert key == worker.worker_id == got["worker"]
    job = await gw.wait_job(QUEUE, jid)
    assert job["result"]["worker"] == key and job["result"]["exitCode"] == 3
    assert await asyncio.to_thread(sent_by_the_job_peer, gw.url, got, key)
    assert not await asyncio.to_thread(
        sent_by_the_job_peer, gw.url, got, await gateway_key(gw)
    )  # the gateway did not write the result: its key is not the finished sender's
    # submitting the same job again neither runs it nor calls back again
    status, again = await gw.json(
        "POST", f"/api/v1/queues/{QUEUE}/jobs", json={"definition": definition, "control": control}
    )
    assert (status, again["cached"]) == (200, True)
    assert len(receiver.attempts("/queued")) == 1


@pytest.mark.docker
async def test_a_callback_to_a_private_address_is_refused_and_the_job_still_runs(
    stack: Stack, busybox_image: str, receiver: Receiver, refusals: Refusals
) -> None:
    gw = await stack.gateway(callbacks=FAST)  # public addresses only: the default
    await stack.worker(QUEUE, allow_urls=(), callbacks=FAST)
    control = {
        "callbacks": {
            "queued": {"url": receiver.url("/queued")},
            "finished": {"url": receiver.url("/finished")},
        }
    }
    definition = {"image": IMAGE, "command": "echo still runs"}
    status, body = await gw.json(
        "POST", f"/api/v1/queues/{QUEUE}/jobs", json={"definition": definition, "control": control}
    )
    assert status == 201, body
    job = await gw.wait_job(QUEUE, body["jobId"])
    assert job["reason"] == "success"

    async with asyncio.timeout(30):
        await refusals.seen["queued"].wait()
        await refusals.seen["finished"].wait()
    assert receiver.calls == []
    said = "\n".join(refusals.lines)
    where = f"127.0.0.1:{receiver.port}"
    assert f"`asman gateway --allow-url {where}`" in said, said
    assert f"`asman worker --allow-url {where}`" in said, said
    assert "loopback" in said
    # logged once each, not once per retry
    assert sum(" not sent: " in line for line in refusals.lines) == 2, said


async def test_cancelling_a_queued_job_sends_finished_from_the_gateway(
    stack: Stack, receiver: Receiver
) -> None:
    """No worker ever ran the job: the gateway's cancel finished it, so the gateway sends
    the finished callback."""
    gw = await stack.gateway(allow_urls=("127.0.0.1",), callbacks=FAST)
    control = {"callbacks": {"finished": {"url": receiver.url("/finished")}}}
    definition = {"image": IMAGE, "command": "echo never"}
    status, body = await gw.json(
        "POST", f"/api/v1/queues/{QUEUE}/jobs", json={"definition": definition, "control": control}
    )
    assert status == 201, body
    status, cancelled = await gw.json(
        "POST", f"/api/v1/queues/{QUEUE}/jobs/{body['jobId']}/cancel", json={"message": "no"}
    )
    assert cancelled["reason"] == "cancelled", cancelled
    call = await receiver.delivered("/finished")
    assert (call.json["finishedReason"], call.json["reason"]) == ("Cancelled", "cancelled")
    assert call.json["exitCode"] is None and call.json["message"] == "no"
    assert verify_asman_callback(call.headers, call.body) == await gateway_key(gw)
    # cancelling again changes nothing and calls back nobody
    status, again = await gw.json("POST", f"/q/{QUEUE}/j/{body['jobId']}/cancel")
    assert status == 200 and again["message"] == "Job already Finished|Removed"
    assert len(receiver.calls) == 1


async def test_a_job_replaced_in_its_namespace_sends_finished_from_the_gateway(
    stack: Stack, receiver: Receiver
) -> None:
    """A newer job in the namespace replaces a job still queued: the gateway's release
    (its Replacer, in the background) finished it, so the gateway sends its finished
    callback, as for its cancel."""
    gw = await stack.gateway(allow_urls=("127.0.0.1",), callbacks=FAST)
    namespace = f"ns{secrets.randbelow(1_000_000)}"
    control = {"callbacks": {"finished": {"url": receiver.url("/finished")}}}
    older = {"image": IMAGE, "command": "echo older"}
    status, first = await gw.json(
        "POST",
        f"/api/v1/queues/{QUEUE}/jobs",
        json={"definition": older, "namespace": namespace, "control": control},
    )
    assert status == 201, first
    newer = {"image": IMAGE, "command": "echo newer"}
    status, second = await gw.json(
        "POST",
        f"/api/v1/queues/{QUEUE}/jobs",
        json={"definition": newer, "control": {"namespace": namespace}},
    )
    assert status == 201, second

    call = await receiver.delivered("/finished")
    got = call.json
    assert (got["jobId"], got["namespace"]) == (first["jobId"], namespace)
    assert (got["reason"], got["finishedReason"]) == ("cancelled", "JobReplacedByClient")
    key = verify_asman_callback(call.headers, call.body)
    assert key == await gateway_key(gw)
    assert await asyncio.to_thread(sent_by_the_job_peer, gw.url, got, key)
    job = await gw.wait_job(QUEUE, first["jobId"])
    assert job["result"]["replacedBy"] == second["jobId"], job["result"]


async def test_the_namespace_and_control_namespace_are_one(gateway: Gateway) -> None:
    """/api/v1 takes a namespace beside the control, which has its own: either names it for
    both, and two different ones are refused before anything reaches the log."""
    jobs_url = f"/api/v1/queues/{QUEUE}/jobs"
    for n, body in enumerate(
        (
            {"namespace": "a"},
            {"control": {"namespace": "a"}},
            {"namespace": "a", "control": {"namespace": "a", "callbacks": {}}},
        )
    ):
        definition = {"image": IMAGE, "command": f"echo one {n}"}
        status, job = await gateway.json("POST", jobs_url, json={"definition": definition, **body})
        assert status == 201, (body, job)
        assert job["namespaces"] == ["a"] and job["control"] == {"namespace": "a"}, (body, job)

    status, answer = await gateway.json(
        "POST",
        jobs_url,
        json={
            "definition": {"image": IMAGE, "command": "echo two"},
            "namespace": "a",
            "control": {"namespace": "b"},
        },
    )
    assert status == 400, answer
    assert answer["error"] == (
        "namespace 'a' and control.namespace 'b' differ: name the namespace once, or the "
        "same in both"
    )
    _, listing = await gateway.json("GET", jobs_url)
    assert listing["count"] == 3  # the refused one never reached the log


async def test_a_job_signed_by_its_own_key_has_its_control_and_the_gateway_calls_back(
    stack: Stack, receiver: Receiver
) -> None:
    """The page signs its submissions with the browser's key: the prepared event carries
    the control and the namespace, so the signed job has them, and the gateway, which
    appended it, sends the queued callback (and the finished one of a cancel that key
    signed). The guide's receiver check accepts the gateway for that job."""
    gw = await stack.gateway(allow_urls=("127.0.0.1",), callbacks=FAST)
    key = PeerKey.generate()
    control = {
        "namespace": "mine",
        "callbacks": {
            "queued": {"url": receiver.url("/queued"), "payload": {"z": 1, "a": [2.5]}},
            "finished": {"url": receiver.url("/finished")},
        },
    }
    definition = {"image": IMAGE, "command": "echo signed"}
    prepare = f"/api/v1/queues/{QUEUE}/jobs/prepare"

    async def sign_and_commit(prepared: dict[str, Any]) -> tuple[int, Any]:
        signature = key.sign(_unb64(prepared["toSign"]))
        parts = {k: prepared[k] for k in ("protected", "payload")}
        return await gw.json(
            "POST", prepared["commit"], json={**parts, "signature": _b64(signature)}
        )

    status, prepared = await gw.json(
        "POST", prepare, json={"definition": definition, "key": key.peer_id, "control": control}
    )
    assert status == 200, prepared
    assert prepared["event"]["namespace"] == "mine"
    assert json.loads(prepared["event"]["control"]) == control
    status, job = await sign_and_commit(prepared)
    assert status == 201, job
    gateway = await gateway_key(gw)
    assert job["submitter"] == key.peer_id != gateway
    assert job["control"] == control and job["namespaces"] == ["mine"]

    queued = await receiver.delivered("/queued")
    assert queued.json["namespace"] == "mine" and queued.json["config"] == {"z": 1, "a": [2.5]}
    sender = verify_asman_callback(queued.headers, queued.body)
    assert sender == gateway  # the gateway appended it, the browser's key signed it
    assert await asyncio.to_thread(sent_by_the_job_peer, gw.url, queued.json, sender)
    assert not await asyncio.to_thread(
        sent_by_the_job_peer, gw.url, queued.json, PeerKey.generate().peer_id
    )

    # the key cancels its job, which never ran: the gateway appended the cancel, it calls back
    status, prepared = await gw.json(
        "POST",
        f"/api/v1/queues/{QUEUE}/jobs/{job['jobId']}/cancel/prepare",
        json={"key": key.peer_id},
    )
    assert status == 200, prepared
    status, cancelled = await sign_and_commit(prepared)
    assert status == 200 and cancelled["reason"] == "cancelled", cancelled
    finished = await receiver.delivered("/finished")
    assert finished.json["reason"] == "cancelled" and finished.json["worker"] == key.peer_id
    sender = verify_asman_callback(finished.headers, finished.body)
    assert sender == gateway
    assert await asyncio.to_thread(sent_by_the_job_peer, gw.url, finished.json, sender)

    # the prepare refuses two namespaces, and a control that is not valid, saying so
    for body, says in (
        ({"namespace": "x", "control": {"namespace": "y"}}, "differ"),
        ({"control": {"callbacks": {"queued": {"url": "ftp://x/"}}}}, "callbacks.queued.url"),
    ):
        status, answer = await gw.json(
            "POST", prepare, json={"definition": definition, "key": key.peer_id, **body}
        )
        assert status == 400 and says in answer["error"], answer


async def test_an_error_in_the_senders_block_is_raised_as_it_is() -> None:
    """`asman jobs cancel` inside a callback sender: its one-line refusal came out as "an
    ExceptionGroup: unhandled errors in a TaskGroup", the sender's task group wrapping it."""
    from asman.errors import InvalidInput
    from asman.peer.netguard import UrlPolicy

    with pytest.raises(InvalidInput, match=r"^refused$"):
        async with CallbackSender(PeerKey.generate(), UrlPolicy.parse([]), FAST):
            raise InvalidInput("refused")


@pytest.mark.parametrize(
    ("control", "says"),
    [
        ({"callbacks": {"queued": {"url": "ftp://example.org/x"}}}, "callbacks.queued.url"),
        ({"callbacks": {"queued": {"url": "/relative"}}}, "absolute http"),
        ({"callbacks": {"started": {"url": "https://example.org"}}}, "queued and finished"),
        ({"callbacks": {"finished": "https://example.org"}}, '{"url"'),
        ({"namespace": 7}, "control.namespace"),
        ({"hooks": {}}, "unknown fields ['hooks']"),
        ("https://example.org", "control must be an object"),
    ],
)
async def test_a_bad_control_is_refused_with_what_is_wrong(
    gateway: Gateway, control: object, says: str
) -> None:
    definition = {"image": IMAGE, "command": "echo x"}
    for path, body in (
        (f"/api/v1/queues/{QUEUE}/jobs", {"definition": definition, "control": control}),
        (f"/q/{QUEUE}", {"definition": definition, "control": control}),
    ):
        status, answer = await gateway.json("POST", path, json=body)
        assert status == 400, (path, answer)
        assert says in answer["error"] and "\n" not in answer["error"], answer
    status, listing = await gateway.json("GET", f"/api/v1/queues/{QUEUE}/jobs")
    assert listing["count"] == 0  # nothing reached the log


@pytest.mark.docker
async def test_the_cli_sends_queued_and_the_worker_finished(
    stack: Stack, busybox_image: str, receiver: Receiver, tmp_path: Path
) -> None:
    worker = await stack.worker(QUEUE, callbacks=FAST)
    cli = Cli(tmp_path / "home", stack.nats.url, verbose=False)
    (tmp_path / "home").mkdir()
    done = await asyncio.to_thread(
        cli.run,
        "submit",
        QUEUE,
        IMAGE,
        "--on-queued",
        receiver.url("/queued"),
        "--on-finished",
        receiver.url("/finished"),
        "--",
        "echo",
        "from the cli",
    )
    assert done.returncode == 0, done.stderr.decode()
    jid = done.stdout.decode().strip()
    # the CLI delivered its callback before it exited
    queued = receiver.attempts("/queued")
    assert [c.status for c in queued] == [200] and queued[0].json["jobId"] == jid
    keys = await asyncio.to_thread(cli.run, "keys")
    cli_key = keys.stdout.decode().strip()
    assert verify_asman_callback(queued[0].headers, queued[0].body) == cli_key

    finished = await receiver.delivered("/finished")
    assert finished.json["jobId"] == jid and finished.json["reason"] == "success"
    assert verify_asman_callback(finished.headers, finished.body) == worker.worker_id


async def test_deliveries_are_bounded_and_abandoned_ones_are_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sender holds at most ``max_pending`` deliveries; when its owner stops, one still
    underway gets the grace, then is abandoned, and each is logged once."""
    from asman.log.keys import PeerKey
    from asman.peer.callbacks import CallbackSender
    from asman.peer.netguard import UrlPolicy

    caplog.set_level(logging.INFO, "asman.peer.callbacks")
    hold = asyncio.Event()
    receiver = await Receiver(hold=hold).start()
    settings = CallbackSettings(max_pending=1, grace_s=0.2, first_delay_s=0.1)
    control = {"callbacks": {"queued": {"url": receiver.url()}}}
    try:
        async with CallbackSender(
            PeerKey.generate(), UrlPolicy.parse(["127.0.0.1"]), settings
        ) as s:
            assert s.queued("q", "a" * 64, control, 1)
            assert not s.queued("q", "b" * 64, control, 1)  # one is underway already
            await receiver.arrived.wait()
        lines = [r.getMessage() for r in caplog.records]
        assert any("job=bbbbbbbbbbbb not sent: 1 callbacks are being" in x for x in lines), lines
        assert any("job=aaaaaaaaaaaa to http://127.0.0.1" in x and "abandoned" in x for x in lines)
        assert s.delivered == 0 and s.failed == 2
    finally:
        hold.set()
        await receiver.close()


def test_the_cli_refuses_a_callback_that_is_not_a_url(tmp_path: Path) -> None:
    cli = Cli(tmp_path, "nats://127.0.0.1:1", verbose=False)  # refused before connecting
    done = cli.run("submit", "q", IMAGE, "--on-finished", "ftp://example.org/x", "--", "true")
    assert done.returncode == 2
    said = done.stderr.decode()
    assert (
        said == "asman: --on-finished 'ftp://example.org/x' is not an absolute http:// or "
        "https:// URL\n"
    ), said
