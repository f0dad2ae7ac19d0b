"""compute-queues' routes without a queue (``/j/<id>/…``): a real gateway that exposes some
queues, a real nats-server, and a real worker with Docker where the job must run."""

from __future__ import annotations

import pytest
from gatewaystack import IMAGE, Gateway, Stack

PUBLIC = "pub"
UNKNOWN = "c" * 64

# each queue-less route, as a suffix of /j/<id> (and of /q/<queue>/j/<id>)
ROUTES = (
    "",
    ".json",
    "/definition.json",
    "/result.json",
    "/results.json",
    "/history.json",
    "/run-logs.json",
    "/build-logs.json",
    "/inputs/note.txt",
    "/outputs/out/copy.txt",
)
JSON = {"Accept": "application/json"}


async def answer(gw: Gateway, path: str) -> tuple[int, str, bytes]:
    async with gw.http.get(path, headers=JSON, allow_redirects=False) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


@pytest.mark.docker
async def test_every_queueless_route_answers_as_the_queued_one(
    stack: Stack, busybox_image: str
) -> None:
    gw = await stack.gateway(exposed_queues=("other", PUBLIC))
    await stack.worker(PUBLIC)
    definition = {
        "image": IMAGE,
        "command": "sh -c 'echo ran; mkdir -p /outputs/out; cat /inputs/note.txt > "
        "/outputs/out/copy.txt'",
        "inputs": {"note.txt": {"type": "utf8", "value": "found without its queue\n"}},
    }
    status, body = await gw.json("POST", f"/q/{PUBLIC}", json={"definition": definition})
    assert status == 200, body
    jid = body["jobId"]
    job = await gw.wait_job(PUBLIC, jid)
    assert job["reason"] == "success", job

    for route in ROUTES:
        queued = await answer(gw, f"/q/{PUBLIC}/j/{jid}{route}")
        assert queued[0] == 200, (route, queued)
        assert await answer(gw, f"/j/{jid}{route}") == queued, route

    status, got = await gw.json("GET", f"/j/{jid}", headers=JSON)
    assert got["data"]["definition"] == definition
    results = got["data"]["results"]
    assert (results["state"], results["finishedReason"]) == ("Finished", "Success")
    status, out, _ = await answer(gw, f"/j/{jid}/outputs/out/copy.txt")
    assert (status, out) == (200, "text/plain; charset=utf-8")
    async with gw.http.get(f"/j/{jid}/outputs/out/copy.txt") as resp:
        assert await resp.read() == b"found without its queue\n"
    status, logs = await gw.json("GET", f"/j/{jid}/run-logs.json")
    assert "".join(logs["data"]) == "ran\n" and logs["isFinal"] is True


async def test_a_job_on_a_queue_not_exposed_is_not_found_without_its_queue(
    stack: Stack,
) -> None:
    gw = await stack.gateway(exposed_queues=(PUBLIC,))
    definition = {"image": IMAGE, "command": "echo private"}
    status, body = await gw.json("POST", "/q/private", json={"definition": definition})
    assert status == 200, body
    jid = body["jobId"]
    status, got = await gw.json("GET", f"/q/private/j/{jid}/definition.json")
    assert (status, got) == (200, {"data": definition})  # it exists, on its own queue

    for route in ("/definition.json", "/result.json", "/results.json"):
        assert await gw.json("GET", f"/j/{jid}{route}") == (200, {"data": None}), route
    for route in ("", ".json", "/history.json", "/run-logs.json", "/inputs/x", "/outputs/x"):
        status, got = await gw.json("GET", f"/j/{jid}{route}", headers=JSON)
        assert status == 404, (route, got)
        assert got["code"] == "job_not_found" and got["message"] == "Job not found"
        assert "private" not in got["error"] and "queue" not in got, got


async def test_an_unknown_job_has_no_definition_and_no_result(stack: Stack) -> None:
    gw = await stack.gateway(exposed_queues=(PUBLIC,))
    for route in ("/definition.json", "/result.json", "/results.json"):
        for path in (
            f"/j/{UNKNOWN}{route}",
            f"/j/{UNKNOWN}{route}?queue={PUBLIC}",
            f"/q/{PUBLIC}/j/{UNKNOWN}{route}",
        ):
            status, got = await gw.json("GET", path)
            assert (status, got) == (200, {"data": None}), path
    status, got = await gw.json("GET", f"/j/{UNKNOWN}", headers=JSON)
    assert status == 404 and got["jobId"] == UNKNOWN, got


async def test_a_gateway_exposing_nothing_says_how_to_expose_a_queue(gateway: Gateway) -> None:
    assert gateway.config.exposed_queues == ()
    for route in ROUTES:
        status, got = await gateway.json("GET", f"/j/{UNKNOWN}{route}", headers=JSON)
        assert status == 400, (route, got)
        assert got["code"] == "invalid_input"
        assert "?queue=" in got["error"] and "--expose QUEUE" in got["error"], got
