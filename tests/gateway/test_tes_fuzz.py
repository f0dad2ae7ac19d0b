"""Fuzz the TES routes from the gateway's OpenAPI document (schemathesis): no 5xx.

Positive and negative cases for each TES operation, with examples that point at a real task
so the task routes reach past their 404; the gateway keeps answering after."""

from __future__ import annotations

import asyncio

import pytest
from gatewaystack import IMAGE, Gateway
from test_fuzz import fuzz, with_examples

pytestmark = [pytest.mark.slow]

QUEUE = "tesfuzz"


async def test_fuzz_the_tes_routes(gateway: Gateway) -> None:
    base = f"/q/{QUEUE}/ga4gh/tes/v1"
    task = {"name": "fuzz", "executors": [{"image": IMAGE, "command": ["echo", "fuzz"]}]}
    status, created = await gateway.json("POST", f"{base}/tasks", json=task)
    assert status == 200, created
    status, doc = await gateway.json("GET", "/openapi.json")
    assert status == 200
    doc["paths"] = {p: op for p, op in doc["paths"].items() if "/ga4gh/tes/" in p}
    assert len(doc["paths"]) == 4
    doc = with_examples(doc, {"queue": QUEUE, "id": created["id"]})
    async with asyncio.timeout(240):
        failures, statuses = await asyncio.to_thread(fuzz, doc, gateway.url)
    assert failures == []
    assert statuses[200] > 5 and statuses[400] > 5, statuses
    status, health = await gateway.json("GET", "/api/v1/health")
    assert status == 200 and health["ok"]
