"""/healthz answers as compute-queues does (issue 15); Asman's JSON health is at
/api/v1/health."""

from __future__ import annotations

from gatewaystack import Gateway


async def test_healthz_answers_ok_as_text_like_compute_queues(gateway: Gateway) -> None:
    async with gateway.http.get("/healthz") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert await resp.text() == "OK"
    status, body = await gateway.json("GET", "/api/v1/health")
    assert (status, body) == (200, {"ok": True, "nats": "connected"})
