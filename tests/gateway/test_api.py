"""The JSON API against a real gateway and nats-server (no worker: nothing here runs)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from gatewaystack import IMAGE, Gateway, Stack, replace_limits
from sseparse import read_events

from asman.log.definition import job_id

Q = "apiqueue"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_health_info_and_openapi(gateway: Gateway) -> None:
    status, body = await gateway.json("GET", "/api/v1/health")
    assert (status, body["ok"]) == (200, True)
    status, info = await gateway.json("GET", "/api/v1/info")
    assert status == 200 and len(info["peerId"]) == 64 and info["blobs"] == "jetstream"
    status, doc = await gateway.json("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    assert "/api/v1/queues/{queue}/jobs" in doc["paths"] and "/q/{queue}" in doc["paths"]


async def test_healthz_is_503_while_the_log_is_away_and_200_once_it_is_back(
    stack: Stack, gateway: Gateway
) -> None:
    async def health_becomes(want: int) -> object:
        async with asyncio.timeout(30):  # the client notices a lost server within seconds
            while True:
                status, body = await gateway.json("GET", "/healthz")
                if status == want:
                    return body
                await asyncio.sleep(0.1)

    # compute-queues' answer while healthy: the text OK
    assert await health_becomes(200) == "OK"
    pid = stack.nats.pid
    await asyncio.to_thread(stack.nats.stop)  # by its PID
    assert await health_becomes(503) == {"ok": False, "nats": "disconnected"}
    await asyncio.to_thread(stack.nats.start)  # the same ports and store
    assert stack.nats.pid != pid
    assert await health_becomes(200) == "OK"
    # and it serves the log again: a submission lands
    status, body = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": {"image": IMAGE, "command": "h"}}
    )
    assert status == 201 and body["state"] == "queued", body


async def test_every_served_route_is_in_the_openapi_document(gateway: Gateway) -> None:
    from asman.gateway import create_app

    _, doc = await gateway.json("GET", "/openapi.json")
    documented = set(doc["paths"])
    app = create_app(gateway.config)
    served = {
        r.canonical
        for r in app.router.resources()
        if r.canonical not in ("/", "/static/{name}", "/openapi.json")
    }
    assert served - documented == set()


async def test_unknown_paths_are_json_404_never_the_page(gateway: Gateway) -> None:
    for path in ("/nope", "/q", "/api/v1/nothing", "/static/missing.js", "/index.html"):
        async with gateway.http.get(path) as resp:
            assert resp.status == 404, path
            assert resp.content_type == "application/json", path
            body = await resp.json()
            assert body["code"] == "not_found" and body["status"] == 404
    status, body = await gateway.json("DELETE", f"/q/{Q}")
    assert status == 405 and body["code"] == "method_not_allowed"


async def test_page_and_static_files(gateway: Gateway) -> None:
    async with gateway.http.get("/") as resp:
        assert resp.status == 200 and resp.content_type == "text/html"
        assert "default-src 'self'" in resp.headers["Content-Security-Policy"]
        assert "/static/app.js" in await resp.text()
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        async with gateway.http.get(f"/static/{name}") as resp:
            assert resp.status == 200 and resp.content_type == ctype


async def test_submit_list_get_and_why_it_waits(gateway: Gateway) -> None:
    definition = {"image": IMAGE, "command": "echo hi"}
    status, body = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": definition}
    )
    assert status == 201, body
    assert body["jobId"] == job_id(definition) and body["state"] == "queued" and body["created"]
    status, again = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": definition}
    )
    assert status == 200 and again["jobId"] == body["jobId"] and not again["created"]

    status, job = await gateway.json("GET", f"/api/v1/queues/{Q}/jobs/{body['jobId']}")
    assert status == 200
    assert job["definition"] == definition
    assert job["waiting"]["code"] == "no_workers"
    assert job["submitter"] == (await gateway.json("GET", "/api/v1/info"))[1]["peerId"]
    assert job["via"] == "gateway"

    status, listing = await gateway.json("GET", f"/api/v1/queues/{Q}/jobs")
    assert status == 200 and [j["jobId"] for j in listing["jobs"]] == [body["jobId"]]
    status, listing = await gateway.json("GET", f"/api/v1/queues/{Q}/jobs?state=finished")
    assert listing["jobs"] == []

    status, logs = await gateway.json("GET", f"/api/v1/queues/{Q}/jobs/{body['jobId']}/logs")
    assert status == 200 and logs["chunks"] == [] and logs["final"] is False


async def test_validate_gives_the_compute_queues_id(gateway: Gateway) -> None:
    definition = {"image": "alpine:3.19.1", "command": 'echo "hello world"'}
    status, body = await gateway.json("POST", "/api/v1/validate", json={"definition": definition})
    assert status == 200
    assert body["jobId"] == "9a684c59f4270fa102f102d2aafe92d5e78ad285116f02d845e5dabbfb0ba873"


async def test_cancel_a_queued_job(gateway: Gateway) -> None:
    status, body = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": {"image": IMAGE, "command": "x"}}
    )
    assert status == 201, body
    jid = body["jobId"]
    status, job = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs/{jid}/cancel", json={"message": "changed my mind"}
    )
    assert status == 200 and job["state"] == "finished" and job["reason"] == "cancelled"
    assert job["result"]["message"] == "changed my mind"


async def test_a_malformed_cancel_body_is_refused_and_cancels_nothing(stack: Stack) -> None:
    gw = await stack.gateway(limits=replace_limits(max_body_bytes=4096, max_definition_bytes=4096))
    status, body = await gw.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": {"image": IMAGE, "command": "c"}}
    )
    assert status == 201, body
    cancel = f"/api/v1/queues/{Q}/jobs/{body['jobId']}/cancel"
    # (body, status, what the reason must name)
    cases: list[tuple[bytes, int, str]] = [
        (b'{"message": 5}', 400, "message must be text"),
        (b'{"message": ["stop"]}', 400, "got an array"),
        (b'{"message": {"text": "stop"}}', 400, "got an object"),
        (b'{"message": true}', 400, "got a boolean"),
        (b'{"message": "stop", "force": true}', 400, "unknown body fields: force"),
        (b'{"reason": "stop"}', 400, "unknown body fields: reason"),
        (json.dumps({"message": "x" * 1001}).encode(), 400, "over the limit of 1000"),
        (json.dumps({"message": "x" * 5000}).encode(), 413, "over the limit of 4096"),
        (b'"stop"', 400, 'the body must be {"message"'),
        (b"[]", 400, 'the body must be {"message"'),
        (b"null", 400, 'the body must be {"message"'),
        (b"stop it", 400, "not valid JSON"),
        (b'{"message": "stop"', 400, "not valid JSON"),
        (b'{"message": NaN}', 400, "not valid JSON"),
        (b'{"message": "\\ud800"}', 400, "valid Unicode"),
        (b"\xff\xfe{}", 400, "not UTF-8"),
        (b"   ", 400, "empty"),
    ]
    for data, want, says in cases:
        status, answer = await gw.json(
            "POST", cancel, data=data, headers={"Content-Type": "application/json"}
        )
        assert status == want, (data[:60], answer)
        assert answer["code"] == ("too_large" if want == 413 else "invalid_input"), answer
        assert says in answer["error"], (data[:60], answer["error"])
        status, job = await gw.json("GET", cancel.removesuffix("/cancel"))
        assert (job["state"], job["cancelRequested"]) == ("queued", False), data[:60]
        assert [h["type"] for h in job["history"]] == ["submitted"], data[:60]
    # the same job, well asked, is cancelled: the refusals were for the bodies alone
    status, job = await gw.json("POST", cancel, json={"message": "now"})
    assert (status, job["reason"], job["result"]["message"]) == (200, "cancelled", "now")


async def test_a_job_from_another_peer_cannot_be_cancelled(stack: Stack, gateway: Gateway) -> None:
    from asman.log import jobs

    peer = await stack.peer()
    sub = await jobs.submit(peer, Q, {"image": IMAGE, "command": "mine"})
    status, body = await gateway.json("POST", f"/api/v1/queues/{Q}/jobs/{sub.job_id}/cancel")
    assert status == 403 and body["code"] == "forbidden"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/v1/queues/bad.queue/jobs", "invalid_queue"),
        ("/api/v1/queues/" + "q" * 65 + "/jobs", "invalid_queue"),
        (f"/api/v1/queues/{Q}/jobs/nothex", "invalid_input"),
        (f"/api/v1/queues/{Q}/jobs?limit=0", "invalid_input"),
        (f"/api/v1/queues/{Q}/jobs?state=lost", "invalid_input"),
        ("/api/v1/blobs/xyz/exists", "invalid_input"),
        (f"/j/{'a' * 64}", "invalid_input"),  # no queue
    ],
)
async def test_bad_names_are_400_json(gateway: Gateway, path: str, code: str) -> None:
    status, body = await gateway.json("GET", path, headers={"Accept": "application/json"})
    assert status == 400, body
    assert body["code"] == code and body["error"]


async def test_missing_job_is_404_json(gateway: Gateway) -> None:
    jid = "b" * 64
    for path in (
        f"/api/v1/queues/{Q}/jobs/{jid}",
        f"/api/v1/queues/{Q}/jobs/{jid}/logs",
        f"/api/v1/queues/{Q}/jobs/{jid}/events",
        f"/api/v1/queues/{Q}/jobs/{jid}/outputs/x.txt",
        f"/q/{Q}/j/{jid}",
        f"/j/{jid}/history.json?queue={Q}",
        f"/q/{Q}/j/{jid}/run-logs.json",
    ):
        status, body = await gateway.json("GET", path)
        assert status == 404, path
        assert body["code"] == "job_not_found", path


@pytest.mark.parametrize(
    ("body", "field", "code"),
    [
        ({"definition": {"command": "echo"}}, "image", "invalid_definition"),
        ({"definition": {"image": IMAGE, "inputs": {"../x": "a"}}}, None, "invalid_path"),
        ({"definition": {"image": IMAGE, "inputs": {"/etc/x": "a"}}}, None, "invalid_path"),
        ({"definition": {"image": IMAGE, "configFiles": {"/inputs/x": "a"}}}, None, "invalid_path"),
        (
            {"definition": {"image": IMAGE, "maxDuration": "forever"}},
            "maxDuration",
            "invalid_definition",
        ),
        ({"definition": "echo"}, "", "invalid_definition"),
        ({"definition": {"image": IMAGE}, "extra": 1}, None, "invalid_input"),
        ({"definition": {"image": IMAGE}, "rerun": "yes"}, None, "invalid_input"),
        ([1, 2], None, "invalid_input"),
    ],
)
async def test_invalid_submissions_never_reach_the_log(
    stack: Stack, gateway: Gateway, body: object, field: str | None, code: str
) -> None:
    from asman.log import jobs

    status, answer = await gateway.json("POST", f"/api/v1/queues/{Q}/jobs", json=body)
    assert status == 400, answer
    assert answer["code"] == code and answer["error"]
    if field is not None:
        assert answer["field"] == field
    assert await jobs.list_jobs(await stack.peer(), Q) == []


async def test_body_and_definition_limits(stack: Stack) -> None:
    from asman.log import jobs

    limits = replace_limits(
        max_body_bytes=32 * 1024,
        max_definition_bytes=16 * 1024,
        max_inline_bytes=1024,
        max_total_inline_bytes=4096,
        max_inputs=3,
    )
    gw = await stack.gateway(limits=limits)
    url = f"/api/v1/queues/{Q}/jobs"

    async def post(definition: object) -> tuple[int, dict[str, object]]:
        status, body = await gw.json("POST", url, json={"definition": definition})
        return status, body

    status, body = await gw.json("POST", url, data=b"{" + b" " * 40_000 + b"}")
    assert status == 413 and body["code"] == "too_large"
    status, body = await post({"image": IMAGE, "env": {"A": "x" * 20_000}})
    assert status == 400 and "over the limit" in str(body["error"])
    status, body = await post({"image": IMAGE, "inputs": {"a": "x" * 2000}})
    assert status == 400 and body["field"] == 'inputs["a"]'
    status, body = await post({"image": IMAGE, "inputs": {f"f{i}": "x" for i in range(4)}})
    assert status == 400 and "over the limit of 3" in str(body["error"])
    status, body = await gw.json("POST", url, data=b"not json")
    assert status == 400 and "not valid JSON" in str(body["error"])
    status, body = await gw.json("POST", url, data=b"[" * 100 + b"]" * 100)
    assert status == 400 and "nested" in str(body["error"])
    status, body = await gw.json("POST", url, data=b'{"definition": NaN}')
    assert status == 400
    assert await jobs.list_jobs(await stack.peer(), Q) == []


async def test_rate_limit_per_client(stack: Stack) -> None:
    gw = await stack.gateway(limits=replace_limits(rate_per_s=0.5, rate_burst=3))
    statuses = []
    for _ in range(5):
        status, body = await gw.json("GET", f"/api/v1/queues/{Q}/workers")
        statuses.append(status)
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    async with gw.http.get(f"/api/v1/queues/{Q}/workers") as resp:
        assert resp.status == 429
        assert int(resp.headers["Retry-After"]) >= 1
        body = await resp.json()
        assert body["code"] == "rate_limited" and "per second" in body["error"]
    status, _ = await gw.json("GET", "/healthz")  # never limited
    assert status == 200


async def test_cors(gateway: Gateway) -> None:
    headers = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    async with gateway.http.options(f"/q/{Q}", headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "Access-Control-Allow-Credentials" not in resp.headers
    async with gateway.http.get("/nope", headers={"Origin": "https://x.example"}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_cors_allow_list(stack: Stack) -> None:
    gw = await stack.gateway(cors_origins=("https://ok.example",))
    async with gw.http.get("/healthz", headers={"Origin": "https://ok.example"}) as resp:
        assert resp.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    async with gw.http.get("/healthz", headers={"Origin": "https://evil.example"}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_blob_put_get_exists_object_store(gateway: Gateway) -> None:
    data = os.urandom(5 * 1024 * 1024 + 3)  # over the in-memory threshold: streamed via a file
    digest = sha(data)
    for prefix in ("/api/v1/blobs", "/f"):
        status, body = await gateway.json("GET", f"{prefix}/{digest}/exists")
        assert (status, body["exists"]) == (404, False)
    status, body = await gateway.json("PUT", f"/f/{sha(b'other')}", data=io.BytesIO(data))
    assert status == 400 and "SHA-256" in body["error"]
    status, body = await gateway.json("PUT", f"/f/{digest}", data=io.BytesIO(data))
    assert status == 200 and body["size"] == len(data)
    for prefix in ("/api/v1/blobs", "/f"):
        status, body = await gateway.json("GET", f"{prefix}/{digest}/exists")
        assert (status, body["exists"], body["size"]) == (200, True, len(data))
        async with gateway.http.get(f"{prefix}/{digest}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Security-Policy"].startswith("sandbox")
            assert await resp.read() == data
    small = b"tiny blob"
    status, body = await gateway.json("PUT", f"/api/v1/blobs/{sha(small)}", data=small)
    assert status == 200
    async with gateway.http.get(f"/f/{sha(small)}") as resp:
        assert await resp.read() == small
    status, body = await gateway.json("GET", f"/f/{sha(b'missing')}")
    assert status == 404 and body["code"] == "blob_not_found"


async def test_blob_size_limit(stack: Stack) -> None:
    gw = await stack.gateway(limits=replace_limits(max_blob_bytes=1000))
    data = b"x" * 2000
    status, body = await gw.json("PUT", f"/f/{sha(data)}", data=data)
    assert status == 413 and body["code"] == "too_large"


async def test_compat_submit_list_and_job(gateway: Gateway) -> None:
    definition = {"image": IMAGE, "command": "echo compat"}
    status, body = await gateway.json("POST", f"/q/{Q}", json={"definition": definition, "id": "x"})
    assert status == 200 and body["success"] is True and body["jobId"] == job_id(definition)
    jid = body["jobId"]
    bare = {"image": IMAGE, "command": "echo bare"}
    status, body2 = await gateway.json("POST", f"/q/{Q}/j", json=bare)
    assert status == 200 and body2["jobId"] == job_id(bare)

    status, listing = await gateway.json("GET", f"/q/{Q}")
    assert status == 200 and set(listing["data"]) == {jid, body2["jobId"]}
    record = listing["data"][jid]
    assert record["state"] == "Queued" and record["worker"] == ""

    for path in (f"/q/{Q}/j/{jid}", f"/j/{jid}?queue={Q}"):
        status, got = await gateway.json("GET", path)
        assert status == 200 and got["data"]["definition"] == definition, path
        assert got["data"]["results"]["state"] == "Queued"
    status, got = await gateway.json("GET", f"/j/{jid}/definition.json?queue={Q}")
    assert got == {"data": definition}
    status, got = await gateway.json("GET", f"/q/{Q}/j/{jid}/result.json")
    assert got == {"data": None}
    status, got = await gateway.json("GET", f"/q/{Q}/status")
    assert status == 200 and got["jobs"][jid] == {"state": "Queued", "finishedReason": None}

    status, got = await gateway.json("POST", f"/q/{Q}/j/{jid}/cancel")  # namespace '_'
    assert got == {"success": True, "jobId": jid, "namespace": "_"}
    status, got = await gateway.json("POST", f"/q/{Q}/j/{jid}/cancel")
    assert got == {"message": "Job already Finished|Removed"}
    status, listing = await gateway.json("GET", f"/q/{Q}")
    assert jid not in listing["data"]  # compute-queues hides cancelled jobs
    status, got = await gateway.json("GET", f"/q/{Q}/j/{jid}/result.json")
    assert got["data"]["finishedReason"] == "Cancelled"


async def test_queue_metrics(gateway: Gateway) -> None:
    for n in range(3):
        status, body = await gateway.json(
            "POST", f"/q/{Q}", json={"image": IMAGE, "command": f"echo {n}"}
        )
        assert status == 200 and body["success"] is True, body
    for path in (f"/q/{Q}/metrics", f"/api/v1/queues/{Q}/metrics"):
        async with gateway.http.get(path) as resp:
            assert resp.status == 200 and resp.content_type == "text/plain"
            text = await resp.text()
        assert "queue_length 3.0" in text
        assert f'asman_queue_depth{{queue="{Q}"}} 3.0' in text
        assert f'asman_queue_workers{{queue="{Q}"}} 0.0' in text
        assert f'asman_queue_finished_jobs{{queue="{Q}",reason="success"}} 0.0' in text
        assert "asman_queue_oldest_waiting_seconds" in text
    async with gateway.http.get("/metrics") as resp:
        text = await resp.text()
    assert "asman_gateway_http_requests_total" in text
    assert 'asman_gateway_jobs_submitted_total{outcome="created"} 3.0' in text


async def test_streams_of_one_job_share_one_reader(gateway: Gateway) -> None:
    status, body = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": {"image": IMAGE}}
    )
    assert status == 201, body
    path = f"/api/v1/queues/{Q}/jobs/{body['jobId']}/events"

    async def metric(name: str) -> float:
        async with gateway.http.get("/metrics") as resp:
            text = await resp.text()
        (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
        return float(line.split()[1])

    async with contextlib.AsyncExitStack() as streams:
        for _ in range(3):
            resp = await streams.enter_async_context(gateway.http.get(path))
            async for ev in read_events(resp):
                if ev["event"] == "state":
                    break
        assert await metric("asman_gateway_event_streams") == 3.0
        assert await metric("asman_gateway_followed") == 1.0
        # (the reader stops with the last stream: tests/gateway/test_follow.py; here the
        # server sees a client leave only at its next write, the ping)


async def test_errors_never_leak_tracebacks(gateway: Gateway) -> None:
    status, body = await gateway.json(
        "POST", f"/api/v1/queues/{Q}/jobs", data=json.dumps({"definition": {"image": 5}})
    )
    assert status == 400 and "Traceback" not in json.dumps(body)


async def test_serve_reports_a_taken_port(stack: Stack, gateway: Gateway) -> None:
    import dataclasses

    from asman.errors import ConfigError
    from asman.gateway import serve

    config = dataclasses.replace(gateway.config, key_path=stack.tmp / "other.key")
    with pytest.raises(ConfigError, match="cannot listen"):
        await serve(config, asyncio.Event())


async def test_serve_without_nats_fails_clearly(tmp_path: Path) -> None:
    from asman.errors import LogUnavailable
    from asman.gateway import GatewayConfig, serve
    from asman.log.connection import LogConfig
    from asman.log.server import free_port

    config = GatewayConfig(
        log=LogConfig(servers=(f"nats://127.0.0.1:{free_port()}",), connect_timeout_s=1),
        key_path=tmp_path / "gw.key",
        port=free_port(),
    )
    with pytest.raises(LogUnavailable, match="cannot reach NATS"):
        await serve(config, asyncio.Event())


async def test_shutdown_ends_open_event_streams(stack: Stack) -> None:
    gw = await stack.gateway(shutdown_timeout_s=120)
    status, body = await gw.json(
        "POST", f"/api/v1/queues/{Q}/jobs", json={"definition": {"image": IMAGE, "command": "w"}}
    )
    assert status == 201, body
    events: list[str] = []
    async with gw.http.get(f"/api/v1/queues/{Q}/jobs/{body['jobId']}/events") as resp:
        async with asyncio.timeout(60):  # far below the shutdown timeout: not waited for
            async for ev in read_events(resp):
                events.append(ev["event"])
                if ev["event"] == "state":
                    gw.stop.set()  # the stream is open and the job will never finish
            assert gw.task is not None
            await gw.task
    assert "state" in events and "end" not in events
