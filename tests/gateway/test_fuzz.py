"""Fuzz the gateway from its own OpenAPI document (schemathesis): no 5xx, no crash.

Every operation gets a few generated requests, valid and invalid (bounded: ten each), plus one
built from examples that point at a real job, so the job routes reach past their 404; the
event streams are left out (they never end by design). The gateway keeps answering after.
"""

from __future__ import annotations

import asyncio
import collections
import copy
from typing import Any

import pytest
from gatewaystack import IMAGE, Stack

from asman.peer.callbacks import CallbackSettings

pytestmark = [pytest.mark.slow]

MAX_EXAMPLES = 10
STREAMS = ("/events", "/stream")
QUEUE = "fuzzq"


def with_examples(doc: dict[str, Any], examples: dict[str, str]) -> dict[str, Any]:
    """The document with ``example`` values for the named parameters (test-only)."""
    out = copy.deepcopy(doc)
    for item in out["paths"].values():
        for op in item.values():
            for param in op.get("parameters", []):
                if param["name"] in examples:
                    param["example"] = examples[param["name"]]
    return out


def fuzz(doc: dict[str, Any], base_url: str) -> tuple[list[str], collections.Counter[int]]:
    """Run the generated requests (in a thread: blocking HTTP); returns the failures and
    the count of each status."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_dict(doc)
    failures: list[str] = []
    statuses: collections.Counter[int] = collections.Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path.endswith(STREAMS):
            continue

        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(
            case=st.one_of(
                operation.as_strategy(GenerationMode.POSITIVE),
                operation.as_strategy(GenerationMode.NEGATIVE),
            )
        )
        def check(case: Any) -> None:
            response = case.call(base_url=base_url, timeout=20, allow_redirects=False)
            statuses[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> {response.status_code}: "
                    f"{response.text[:300]}"
                )

        check()
    return failures, statuses


async def test_fuzz_the_api_from_its_openapi_document(stack: Stack) -> None:
    # generated controls name callback URLs on made-up hosts: the gateway sends none (it
    # would resolve them), as if that many deliveries were underway already
    gateway = await stack.gateway(callbacks=CallbackSettings(max_pending=0))
    definition = {
        "image": IMAGE,
        "command": "echo fuzz",
        "inputs": {"a.txt": "hello", "d/b.bin": {"type": "base64", "value": "AAEC"}},
    }
    status, job = await gateway.json(
        "POST", f"/api/v1/queues/{QUEUE}/jobs", json={"definition": definition}
    )
    assert status == 201
    status, doc = await gateway.json("GET", "/openapi.json")
    assert status == 200
    doc = with_examples(doc, {"queue": QUEUE, "job": job["jobId"], "path": "a.txt"})
    async with asyncio.timeout(240):
        failures, statuses = await asyncio.to_thread(fuzz, doc, gateway.url)
    assert failures == []
    assert sum(statuses.values()) > 150, statuses
    assert statuses[200] > 20 and statuses[400] > 20, statuses  # deep and shallow both
    status, health = await gateway.json("GET", "/api/v1/health")
    assert status == 200 and health["ok"]
