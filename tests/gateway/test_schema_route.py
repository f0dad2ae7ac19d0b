"""One schema source: the definition's JSON Schema the page's editor reads, and the OpenAPI
document's definition and TES schemas, all generated from the pydantic models."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
from gatewaystack import IMAGE, Gateway

from asman.gateway import tes
from asman.log.definition import validate_definition

SCHEMA = "/api/v1/schema/definition.json"
SHA = "a" * 64
VALID: list[dict[str, Any]] = [
    {"image": IMAGE, "command": "echo hi"},
    {"build": {"dockerfile": "FROM scratch\n", "buildArgs": ["A=1"]}, "command": ["true"]},
    {
        "image": IMAGE,
        "command": ["sh", "-c", "x"],
        "env": {"A": "1"},
        "workdir": "/w",
        "shmSize": 64,
        "maxDuration": "1h30m",
        "tags": ["t"],
        "requirements": {"cpus": 0.5, "gpus": 1, "memory": "512m", "maxDuration": 60},
        "inputs": {"a.txt": "hi", "b": {"value": SHA, "type": "blob", "size": 3}},
        "configFiles": {"/etc/x.conf": {"value": {"k": 1}, "type": "json"}},
        "someUnknownKey": {"kept": True},
        "v": 1,
    },
    {
        "volumes": ["/data"],
        "steps": [
            {"image": IMAGE, "command": "echo 1", "stdout": "/data/x"},
            {"image": IMAGE, "command": ["cat", "/data/x"], "ignoreError": True},
        ],
        "outputPaths": [{"path": "/data/x", "url": "s3://b/k"}],
    },
]
REFUSED_BY_BOTH: list[dict[str, Any]] = [
    {"command": "no image"},
    {"image": 3},
    {"image": "a b"},
    {"image": IMAGE, "requirements": {"cpus": "2"}},
    {"image": IMAGE, "requirements": {"cpus": 0}},
    {"image": IMAGE, "requirements": {"gpus": 65}},
    {"image": IMAGE, "env": {"A": 1}},
    {"image": IMAGE, "tags": "t"},
    {"image": IMAGE, "inputs": {"a": {"value": "x", "type": "nope"}}},
    {"image": IMAGE, "steps": []},
    {"image": IMAGE, "steps": [{"command": "x", "typo": 1}]},
    {"image": IMAGE, "outputPaths": [{"url": "s3://b/k"}]},
]


async def test_the_editor_s_schema_accepts_what_the_gateway_accepts(gateway: Gateway) -> None:
    status, schema = await gateway.json("GET", SCHEMA)
    assert status == 200, schema
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert {"image", "build", "command", "steps", "inputs", "requirements"} <= set(
        schema["properties"]
    )
    requirements = schema["$defs"]["Requirements"]["properties"]
    assert (requirements["cpus"]["maximum"], requirements["gpus"]["maximum"]) == (1024, 64)
    validator = jsonschema_rs.validator_for(schema)
    for d in VALID:
        validate_definition(d)
        assert validator.is_valid(d), (d, [e.message for e in validator.iter_errors(d)])
    for d in REFUSED_BY_BOTH:
        status, body = await gateway.json("POST", "/api/v1/validate", json={"definition": d})
        assert status == 400, (d, body)
        assert not validator.is_valid(d), d


async def test_openapi_schemas_are_the_generated_ones(gateway: Gateway) -> None:
    _, doc = await gateway.json("GET", "/openapi.json")
    _, schema = await gateway.json("GET", SCHEMA)
    schemas = doc["components"]["schemas"]
    assert set(schemas["Definition"]["properties"]) == set(schema["properties"])
    assert SCHEMA in doc["paths"]
    for name in ("Build", "Requirements", "Step", "OutputPath", "DataRefObject"):
        assert schemas[name]["properties"] == schema["$defs"][name]["properties"]
    # the TES fields a task may carry are the ones the TES routes accept
    assert set(schemas["TesTask"]["properties"]) == tes.TASK_KEYS
    assert set(schemas["TesExecutor"]["properties"]) == tes.EXECUTOR_KEYS
    assert set(schemas["TesInput"]["properties"]) == tes.INPUT_KEYS
    assert set(schemas["TesOutput"]["properties"]) == tes.OUTPUT_KEYS
    assert set(schemas["TesResources"]["properties"]) == tes.RESOURCE_KEYS
