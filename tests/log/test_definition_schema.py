"""The definition's models: the JSON Schema they write never refuses a definition their rules
accept (the page's editor must not flag a job the gateway runs)."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asman.errors import InvalidInput
from asman.log.definition import validate_definition
from asman.log.schema import definition_json_schema

SHA = "b" * 64
VALIDATOR = jsonschema_rs.validator_for(definition_json_schema())

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)
# for each field: values its rules accept, values they refuse, and anything at all
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "v": st.sampled_from([1, 2.0, "1"]),
    "image": st.sampled_from(["alpine:3.20", "a b", ""]),
    "build": st.sampled_from(
        [{"dockerfile": "FROM a"}, {"context": "https://x/y", "buildArgs": {"A": "1"}}, {}]
    ),
    "command": st.sampled_from(["echo hi", ["a", "b"], [], ["a", 1]]),
    "entrypoint": st.sampled_from(["sh -c", ["sh"]]),
    "env": st.dictionaries(st.sampled_from(["A", "B", "mp-x", ""]), st.text(max_size=4)),
    "workdir": st.sampled_from(["/w", "w"]),
    "shmSize": st.sampled_from(["64m", 1024, "x", 0]),
    "maxDuration": st.sampled_from(["10m", 60, "1h30m", 2.0, -1]),
    "tags": st.lists(st.sampled_from(["a", "gpu", ""]), max_size=2),
    "requirements": st.fixed_dictionaries(
        {},
        optional={
            "cpus": st.sampled_from([0.5, 2, 1024, 0, "2"]),
            "gpus": st.sampled_from([0, 1, 2.0, 65]),
            "memory": st.sampled_from(["512m", 2**30, "lots"]),
            "maxDuration": st.sampled_from(["1m", 5]),
            "extra": json_values,
        },
    ),
    "inputs": st.dictionaries(
        st.sampled_from(["a.txt", "d/b", "../x"]),
        st.sampled_from(
            [
                "text",
                "data:text/plain,hi",
                {"value": "aGk=", "type": "base64", "hash": SHA, "size": 2},
                {"value": {"k": [1]}, "type": "json"},
                {"value": SHA, "type": "blob"},
                {"value": "s3://b/k", "type": "s3"},
                {"value": "x", "type": "nope"},
            ]
        ),
        max_size=3,
    ),
    "configFiles": st.dictionaries(
        st.sampled_from(["/etc/a.conf", "c.ini", "/proc/x"]), st.just("x"), max_size=2
    ),
    "volumes": st.lists(st.sampled_from(["/data", "/work", "rel"]), max_size=2),
    "outputPaths": st.lists(
        st.sampled_from(
            [
                {"path": "/data/out.txt", "url": "s3://b/k"},
                {"path": "/data/*.log", "pathPrefix": "/data/"},
                {"path": "/res", "type": "directory"},
                {"url": "s3://b/k"},
            ]
        ),
        max_size=2,
    ),
    "steps": st.lists(
        st.fixed_dictionaries(
            {},
            optional={
                "image": st.sampled_from(["busybox:1", "a b"]),
                "command": st.sampled_from(["echo 1", ["cat", "/data/x"]]),
                "stdout": st.sampled_from(["/data/o", "/outputs/o", "/x/o"]),
                "env": st.dictionaries(st.sampled_from(["A", "B"]), st.text(max_size=3)),
                "ignoreError": st.booleans(),
            },
        ),
        max_size=3,
    ),
    "unknownKey": json_values,
}


@st.composite
def definitions(draw: st.DrawFn) -> dict[str, Any]:
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=7))
    d = {k: draw(FIELDS[k] | json_values) if k != "unknownKey" else draw(json_values) for k in keys}
    if draw(st.booleans()):
        d.setdefault("image", "alpine:3.20")
    return d


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(definitions())
def test_the_schema_accepts_every_definition_the_rules_accept(d: dict[str, Any]) -> None:
    try:
        validate_definition(d)
    except InvalidInput:
        return
    assert VALIDATOR.is_valid(d), [e.message for e in VALIDATOR.iter_errors(d)]
