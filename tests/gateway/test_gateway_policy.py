"""The gateway and queue policies (issue 14): it shows a queue's policy, refuses with the
reason what the policy would ignore, and marks each result as run by a trusted worker or not."""

from __future__ import annotations

import dataclasses

import pytest
from gatewaystack import Gateway, Stack

from asman.log import queues
from asman.log.keys import PeerKey
from asman.log.policy import Policy, new_private_queue

pytestmark = [pytest.mark.docker]

BODY = {"definition": {"image": "asman/busybox:local", "command": "echo policy"}}


async def test_policy_route_refusal_and_trusted_mark(
    stack: Stack, gateway: Gateway, busybox_image: str
) -> None:
    status, open_view = await gateway.json("GET", "/api/v1/queues/openq/policy")
    assert status == 200 and open_view["policy"] is None and not open_view["ownerBound"]
    assert open_view["summary"].startswith("open")

    owner = await stack.peer()
    queue = new_private_queue(owner.peer_id)
    me = owner.peer_id
    await queues.write_policy(
        owner,
        queue,
        lambda _: Policy(queue, 0, me, me, submitters=frozenset({me}), workers=frozenset()),
    )
    status, shown = await gateway.json("GET", f"/api/v1/queues/{queue}/policy")
    assert status == 200 and shown["policy"]["version"] == 1
    assert shown["policy"]["owner"] == me and shown["policy"]["workers"] == []

    # the gateway's key may not submit yet: a 403 that says what to ask
    status, refused = await gateway.json("POST", f"/api/v1/queues/{queue}/jobs", json=BODY)
    assert status == 403 and "lets only listed keys submit" in refused["error"]

    gateway_key = PeerKey.load(gateway.config.key_path).peer_id
    worker = await stack.worker(queue)
    await queues.write_policy(
        owner,
        queue,
        lambda p: dataclasses.replace(
            p,
            submitters=p.submitters | {gateway_key},  # type: ignore[operator]
            workers=frozenset({worker.log.peer_id}),
        ),
    )
    status, sub = await gateway.json("POST", f"/api/v1/queues/{queue}/jobs", json=BODY)
    assert status in (200, 201, 202), sub
    done = await gateway.wait_job(queue, sub["jobId"])
    assert done["result"]["reason"] == "success"
    assert done["result"]["trustedWorker"] is True

    await stack.worker("openq")
    status, sub = await gateway.json("POST", "/api/v1/queues/openq/jobs", json=BODY)
    done = await gateway.wait_job("openq", sub["jobId"])
    assert done["result"]["reason"] == "success" and done["result"]["trustedWorker"] is False
