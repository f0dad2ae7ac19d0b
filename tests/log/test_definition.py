"""The job definition: validation, data references, the job id and the typed view."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from typing import Any

import pytest
import rfc8785
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asman.errors import InvalidDefinition, InvalidInput, InvalidPath
from asman.log import definition as definition_module
from asman.log.definition import (
    BuildSpec,
    DataRef,
    DefinitionLimits,
    JobSpec,
    canonical_form,
    image_class,
    job_id,
    parse_duration_ms,
    parse_size_bytes,
    split_command,
    validate_definition,
    validate_relative_path,
)

HELLO = {"image": "alpine:3.19.1", "command": 'echo "hello world"'}
HELLO_ID = "9a684c59f4270fa102f102d2aafe92d5e78ad285116f02d845e5dabbfb0ba873"
SHA = "a" * 64


def test_public_names() -> None:
    public = {n for n in vars(definition_module) if not n.startswith("_")}
    for name in definition_module.__all__:
        assert name in public


# ---------------------------------------------------------------------------------------------
# job id: test vectors


def test_job_id_test_vector() -> None:
    assert job_id(HELLO) == HELLO_ID
    assert canonical_form(HELLO) == HELLO


@pytest.mark.parametrize(
    "extra",
    [
        {"env": {}},
        {"inputs": {}},
        {"configFiles": {}},
        {"requirements": {}},
        {"build": None},
        {"build": {}},
        {"someUnknownField": {"x": 1}},
        {"env": {"channel": "c1", "CHANNEL": "c2", "mp-page": "p", "mp_user": "u"}},
        {"env": {"readonly": "1", "edit": "1", "parent-metapage-id": "x", "fs-path": "/"}},
        {"workdir": None, "tags": None, "v": None},
        {"requirements": {"cpus": None, "other": 3}},
        {"build": {"unknownKey": "x"}},
    ],
)
def test_job_id_ignores_irrelevant_fields(extra: dict[str, Any]) -> None:
    assert job_id({**HELLO, **extra}) == HELLO_ID


def test_job_id_ignores_ref_hash_and_size_and_extras() -> None:
    a = {**HELLO, "inputs": {"x": {"value": "hi", "type": "utf8"}}}
    b = {**HELLO, "inputs": {"x": {"value": "hi", "type": "utf8", "hash": SHA, "size": 2, "z": 1}}}
    assert job_id(a) == job_id(b)


def test_job_id_integral_floats_hash_like_ints() -> None:
    a = {**HELLO, "v": 1, "requirements": {"cpus": 2, "gpus": 1}}
    b = {**HELLO, "v": 1.0, "requirements": {"cpus": 2.0, "gpus": 1.0}}
    assert job_id(a) == job_id(b)
    assert job_id({**HELLO, "requirements": {"cpus": 2.5}}) != job_id(a)


def test_job_id_sorts_keys_by_utf16_code_units_like_javascript() -> None:
    # U+1F600 is the surrogate pair D83D DE00, which sorts before U+E000 in UTF-16
    d = {"image": "a", "env": {"\ue000": "1", "\U0001f600": "2"}}
    expected = '{"env":{"\U0001f600":"2","\ue000":"1"},"image":"a"}'
    assert job_id(d) == hashlib.sha256(expected.encode()).hexdigest()


def test_job_id_needs_only_a_mapping() -> None:
    # not a valid definition (no image, wrong types), still a stable id
    weird = {"command": 3, "env": "x", "inputs": ["a"], "build": "y"}
    assert job_id(weird) == job_id(dict(reversed(list(weird.items()))))
    with pytest.raises(InvalidDefinition, match="job id"):
        job_id({"image": float("nan")})


def test_job_id_ref_type_as_given() -> None:
    # compute-queues hashes {value, type?} as given, so an explicit default type is a
    # different id; kept for compatibility with ids compute-queues computes
    a = {**HELLO, "inputs": {"x": {"value": "hi"}}}
    b = {**HELLO, "inputs": {"x": {"value": "hi", "type": "utf8"}}}
    assert job_id(a) != job_id(b)


def test_job_id_string_refs_hash_as_their_object_form() -> None:
    obj = {**HELLO, "inputs": {"x": {"value": "hi", "type": "utf8"}}}
    assert job_id({**HELLO, "inputs": {"x": "hi"}}) == job_id(obj)
    data_url = "data:text/plain;charset=utf-8,hi"
    assert job_id({**HELLO, "inputs": {"x": data_url}}) == job_id(obj)
    u = "https://example.com/f/1"
    as_url = {**HELLO, "inputs": {"x": {"value": u, "type": "url"}}}
    uri = "data:text/x-uri;charset=utf-8,https%3A%2F%2Fexample.com%2Ff%2F1"
    assert job_id({**HELLO, "inputs": {"x": uri}}) == job_id(as_url)


@pytest.mark.parametrize(
    ("url", "same_as"),
    [
        ("https://api.example/f/abc/presignedurl/xyz?sig=1", "https://api.example/f/abc"),
        (
            "https://metaframe-asman-test.s3.us-west-1.amazonaws.com/f/abc?X-Amz=1#frag",
            "https://metaframe-asman-test.s3.us-west-1.amazonaws.com/f/abc",
        ),
    ],
)
def test_job_id_normalises_presigned_urls(url: str, same_as: str) -> None:
    def ref(u: str) -> dict[str, Any]:
        return {**HELLO, "configFiles": {"f": {"value": u, "type": "url"}}}

    assert job_id(ref(url)) == job_id(ref(same_as))


def test_job_id_keeps_query_of_other_urls() -> None:
    def ref(u: str) -> dict[str, Any]:
        return {**HELLO, "inputs": {"f": {"value": u, "type": "url"}}}

    assert job_id(ref("https://x.example/a?v=1")) != job_id(ref("https://x.example/a"))


def test_canonical_form_whitelist() -> None:
    d = {
        "image": "img",
        "build": {"context": "https://g/x", "secret": "s", "buildArgs": ["A=1"]},
        "requirements": {"gpus": 1, "memory": "1g", "zone": "eu"},
        "env": {"A": "1", "mp-x": "2", "B": None},
        "inputs": {"in": {"value": "v", "hash": SHA}, "gone": None},
        "control": {"namespace": "n"},
    }
    assert canonical_form(d) == {
        "image": "img",
        "build": {"context": "https://g/x", "buildArgs": ["A=1"]},
        "requirements": {"gpus": 1, "memory": "1g"},
        "env": {"A": "1"},
        "inputs": {"in": {"value": "v"}},
    }


# ---------------------------------------------------------------------------------------------
# job id: properties

names = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=8
)
# env keys an embedding page injects are not job data (definition.is_injected_env)
plain_names = names.filter(lambda k: not definition_module.is_injected_env(k))
short_text = st.text(max_size=12)
refs = st.fixed_dictionaries(
    {"value": short_text}, optional={"type": st.sampled_from(["utf8", "base64", "key", "json"])}
)
full_definitions = st.fixed_dictionaries(
    {
        "v": st.integers(0, 1000),
        "image": st.text(min_size=1, max_size=20),
        "command": short_text,
        "entrypoint": short_text,
        "workdir": short_text,
        "shmSize": short_text,
        "maxDuration": short_text,
        "tags": st.lists(short_text, min_size=1, max_size=3),
        "requirements": st.fixed_dictionaries(
            {
                "cpus": st.integers(1, 64) | st.floats(0.1, 64),
                "gpus": st.integers(0, 8),
                "maxDuration": short_text,
                "memory": short_text,
            }
        ),
        "build": st.fixed_dictionaries(
            {
                "context": short_text,
                "buildContext": short_text,
                "filename": short_text,
                "target": short_text,
                "dockerfile": short_text,
                "buildArgs": st.lists(short_text, max_size=2),
                "platform": short_text,
            }
        ),
        "env": st.dictionaries(plain_names, short_text, min_size=1, max_size=4),
        "inputs": st.dictionaries(names, refs, min_size=1, max_size=4),
        "configFiles": st.dictionaries(names, refs, max_size=3),
    }
)


def _shuffled(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(full_definitions, st.randoms(use_true_random=False))
def test_id_stable_under_key_order(d: dict[str, Any], rnd: random.Random) -> None:
    assert job_id(_shuffled(d, rnd)) == job_id(d)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(
    full_definitions,
    st.dictionaries(
        names.filter(lambda k: k not in definition_module.__dict__["_SCALAR_KEYS"]),
        st.none() | short_text,
        max_size=3,
    ),
    st.dictionaries(names.map(lambda k: "mp-" + k), short_text, max_size=3),
    st.data(),
)
def test_id_stable_under_irrelevant_fields(
    d: dict[str, Any], unknown: dict[str, Any], injected: dict[str, str], data: st.DataObject
) -> None:
    known = {"build", "requirements", "env", "inputs", "configFiles"}
    noisy = copy.deepcopy(d)
    for key, value in unknown.items():
        if key not in known:
            noisy[key] = value
    noisy["env"].update(injected)
    noisy["env"]["channel"] = data.draw(short_text)
    noisy["requirements"]["cpuModel"] = "x"
    noisy["build"]["unknown"] = None
    for name, ref in noisy["inputs"].items():
        ref["hash"] = data.draw(st.sampled_from([SHA, "b" * 64]))
        ref["size"] = data.draw(st.integers(0, 10))
        noisy["inputs"][name] = ref
    if not noisy["configFiles"]:
        noisy["configFiles"] = {}
    assert job_id(noisy) == job_id(d)
    # dropping a field and setting it to null are the same
    for key in ("workdir", "tags", "v"):
        assert job_id({**d, key: None}) == job_id({k: v for k, v in d.items() if k != key})


def _bump(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [*value, "x"]
    raise AssertionError(value)


CHANGES = [
    *[(k,) for k in ("image", "command", "entrypoint", "workdir", "shmSize", "maxDuration", "v")],
    *[("requirements", k) for k in ("cpus", "gpus", "maxDuration", "memory")],
    *[
        ("build", k)
        for k in (
            "context",
            "buildContext",
            "filename",
            "target",
            "dockerfile",
            "buildArgs",
            "platform",
        )
    ],
    ("tags",),
]


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(full_definitions, st.sampled_from(CHANGES))
def test_every_field_changes_the_id(d: dict[str, Any], path: tuple[str, ...]) -> None:
    changed = copy.deepcopy(d)
    target = changed
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = _bump(target[path[-1]])
    assert job_id(changed) != job_id(d)


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(full_definitions, st.data())
def test_env_tags_and_inputs_change_the_id(d: dict[str, Any], data: st.DataObject) -> None:
    base = job_id(d)
    name = data.draw(st.sampled_from(sorted(d["env"])))
    assert job_id({**d, "env": {**d["env"], name: d["env"][name] + "x"}}) != base
    assert job_id({**d, "tags": [d["tags"][0] + "x", *d["tags"][1:]]}) != base
    name = data.draw(st.sampled_from(sorted(d["inputs"])))
    ref = d["inputs"][name]
    new_value = {**ref, "value": ref["value"] + "x"}
    assert job_id({**d, "inputs": {**d["inputs"], name: new_value}}) != base
    new_type = {**ref, "type": "url" if ref.get("type") != "url" else "key"}
    assert job_id({**d, "inputs": {**d["inputs"], name: new_type}}) != base


# ---------------------------------------------------------------------------------------------
# validation


def test_valid_definition_returned_without_nulls() -> None:
    d = {
        **HELLO,
        "workdir": None,
        "env": {"A": "1", "B": None},
        "inputs": {"x": {"value": "1", "hash": None}},
        "unknown": {"kept": None},
    }
    before = copy.deepcopy(d)
    out = validate_definition(d)
    assert out == {
        **HELLO,
        "env": {"A": "1"},
        "inputs": {"x": {"value": "1"}},
        "unknown": {"kept": None},
    }
    assert d == before  # not mutated


def test_full_valid_definition() -> None:
    d = {
        "v": 1,
        "build": {
            "context": "https://github.com/a/b/tree/main",
            "buildContext": "sub/dir",
            "filename": "Dockerfile.gpu",
            "target": "run",
            "dockerfile": "FROM alpine\n",
            "buildArgs": {"A": "1"},
            "platform": "linux/amd64",
        },
        "command": ["python", "-c", "print(1)"],
        "entrypoint": "/bin/sh -c",
        "env": {"A": "b c"},
        "workdir": "/work",
        "shmSize": "2g",
        "inputs": {
            "a/b.txt": {"value": "hello"},
            "c.bin": {"value": "aGVsbG8=", "type": "base64", "hash": SHA},
            "d.json": {"value": {"k": [1, 2]}, "type": "json"},
            "e": {"value": "https://example.com/f/1", "type": "url"},
            "f": {"value": "legacy-key", "type": "key"},
            "g": {"value": SHA, "type": "blob", "size": 10},
            "h": "plain text",
            "i": "data:application/octet-stream;base64,aGVsbG8=",
        },
        "configFiles": {"/etc/app.conf": {"value": "x=1"}, "conf.ini": {"value": ""}},
        "maxDuration": "1h30m",
        "tags": ["gpu"],
        "requirements": {"cpus": 0.5, "gpus": 1, "memory": "512m", "maxDuration": 600},
    }
    assert validate_definition(d) == d


BAD_DEFINITIONS: list[tuple[dict[str, Any], str, str]] = [
    ({}, "image", "'build'"),
    ({"command": "ls"}, "image", "needs an 'image'"),
    ({"image": "a", "build": {"dockerfile": "FROM a"}}, "image", "not both"),
    ({"image": 3}, "image", "must be a string, got 3"),
    ({"image": ""}, "image", "empty"),
    ({"image": "al pine"}, "image", "white space"),
    ({**HELLO, "v": "1"}, "v", "whole number"),
    ({**HELLO, "v": True}, "v", "whole number"),
    ({**HELLO, "command": 3}, "command", "list of strings"),
    ({**HELLO, "command": ["ls", 3]}, "command[1]", "must be a string"),
    ({**HELLO, "command": "echo 'unterminated"}, "command", "cannot be split"),
    ({**HELLO, "entrypoint": {"a": 1}}, "entrypoint", "list of strings"),
    ({**HELLO, "env": ["A=1"]}, "env", "must be an object"),
    ({**HELLO, "env": {"A": 1}}, 'env["A"]', "must be a string"),
    ({**HELLO, "env": {"": "x"}}, 'env[""]', "must not be empty"),
    ({**HELLO, "env": {"A=B": "x"}}, 'env["A=B"]', "'='"),
    ({**HELLO, "workdir": "work"}, "workdir", "absolute path"),
    ({**HELLO, "workdir": 1}, "workdir", "must be a string"),
    ({**HELLO, "shmSize": "2q"}, "shmSize", '"2g"'),
    ({**HELLO, "shmSize": -1}, "shmSize", "≥ 0"),
    ({**HELLO, "shmSize": [1]}, "shmSize", "size"),
    ({**HELLO, "maxDuration": "10x"}, "maxDuration", "units ms, s, m, h, d"),
    ({**HELLO, "maxDuration": "10"}, "maxDuration", "duration"),
    ({**HELLO, "maxDuration": 0}, "maxDuration", "> 0"),
    ({**HELLO, "maxDuration": "31d"}, "maxDuration", "over the limit of 2592000000 ms"),
    ({**HELLO, "tags": "gpu"}, "tags", "list of strings"),
    ({**HELLO, "tags": [1]}, "tags[0]", "must be a string"),
    ({**HELLO, "requirements": []}, "requirements", "must be an object"),
    ({**HELLO, "requirements": {"cpus": 0}}, "requirements.cpus", "at most 1024, got 0"),
    ({**HELLO, "requirements": {"cpus": 1025}}, "requirements.cpus", "at most 1024, got 1025"),
    ({**HELLO, "requirements": {"gpus": 65}}, "requirements.gpus", "from 0 to 64, got 65"),
    ({**HELLO, "requirements": {"memory": "17t"}}, "requirements.memory", "limit of 16 TiB"),
    ({**HELLO, "requirements": {"memory": "9" * 5000}}, "requirements.memory", "far too large"),
    ({**HELLO, "shmSize": "9" * 4400}, "shmSize", "far too large"),
    ({**HELLO, "shmSize": 10**40}, "shmSize", "far too large"),
    ({**HELLO, "maxDuration": "9" * 100_000 + "d"}, "maxDuration", "far too long"),
    ({**HELLO, "maxDuration": 10**30}, "maxDuration", "far too long"),
    ({**HELLO, "requirements": {"cpus": "2"}}, "requirements.cpus", 'got "2"'),
    ({**HELLO, "requirements": {"cpus": True}}, "requirements.cpus", "number > 0"),
    ({**HELLO, "requirements": {"gpus": 1.5}}, "requirements.gpus", "whole number from 0 to 64"),
    ({**HELLO, "requirements": {"memory": "lots"}}, "requirements.memory", "size"),
    ({**HELLO, "requirements": {"memory": "0"}}, "requirements.memory", "> 0"),
    ({**HELLO, "requirements": {"maxDuration": "x"}}, "requirements.maxDuration", "duration"),
    ({"build": 3}, "build", "must be an object"),
    ({"build": {}}, "build", "'context'"),
    ({"build": {"context": 3}}, "build.context", "must be a string"),
    ({"build": {"dockerfile": "F", "target": ""}}, "build.target", "empty"),
    ({"build": {"dockerfile": "F", "buildArgs": "A=1"}}, "build.buildArgs", "NAME=value"),
    ({"build": {"dockerfile": "F", "buildArgs": ["A"]}}, "build.buildArgs[0]", "NAME=value"),
    ({"build": {"dockerfile": "F", "buildArgs": {"A": 1}}}, 'build.buildArgs["A"]', "string"),
    ({"build": {"dockerfile": "F", "platform": 1}}, "build.platform", "string"),
    ({**HELLO, "inputs": []}, "inputs", "must be an object"),
    ({**HELLO, "inputs": {"a": 3}}, 'inputs["a"]', "data reference"),
    (
        {**HELLO, "inputs": {"a/b.txt": {"type": "x", "value": "1"}}},
        'inputs["a/b.txt"].type',
        "utf8",
    ),
    ({**HELLO, "inputs": {"a": {"type": "utf8"}}}, 'inputs["a"].value', "missing"),
    ({**HELLO, "inputs": {"a": {"value": 1}}}, 'inputs["a"].value', "must be a string"),
    ({**HELLO, "inputs": {"a": {"value": "!", "type": "base64"}}}, 'inputs["a"].value', "base64"),
    ({**HELLO, "inputs": {"a": {"value": "ftp://x/y", "type": "url"}}}, 'inputs["a"].value', "URL"),
    ({**HELLO, "inputs": {"a": {"value": "ABC", "type": "blob"}}}, 'inputs["a"].value', "SHA-256"),
    ({**HELLO, "inputs": {"a": {"value": "", "type": "key"}}}, 'inputs["a"].value', "empty"),
    (
        {**HELLO, "inputs": {"a": {"value": float("nan"), "type": "json"}}},
        'inputs["a"].value',
        "JSON",
    ),
    ({**HELLO, "inputs": {"a": {"value": "1", "hash": "abc"}}}, 'inputs["a"].hash', "hex"),
    ({**HELLO, "inputs": {"a": {"value": "1", "size": -1}}}, 'inputs["a"].size', "≥ 0"),
    ({**HELLO, "configFiles": {"a": {"value": "1", "type": 3}}}, 'configFiles["a"].type', "one of"),
    (
        {**HELLO, "inputs": {"a": "x"}, "configFiles": {"a": "y"}},
        'configFiles["a"]',
        'also declared in inputs["a"]',
    ),
    ({**HELLO, "inputs": {"a": "x", "a/b": "y"}}, 'inputs["a/b"]', "cannot be a folder"),
    (
        {**HELLO, "configFiles": {"/etc/a": "x", "/etc/a/b": "y"}},
        'configFiles["/etc/a/b"]',
        "folder",
    ),
    ({**HELLO, "data": {1, 2}}, "", "not JSON"),
]


@pytest.mark.parametrize(("d", "field", "words"), BAD_DEFINITIONS)
def test_invalid_definitions(d: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidDefinition) as err:
        validate_definition(d)
    assert err.value.field == field
    if field:
        assert str(err.value).startswith(f"definition field '{field}': ")
    assert words in str(err.value)


def test_gpus_message_exactly() -> None:
    with pytest.raises(InvalidDefinition) as err:
        validate_definition({**HELLO, "requirements": {"gpus": -1}})
    assert str(err.value) == (
        "definition field 'requirements.gpus': must be a whole number from 0 to 64, got -1"
    )


def test_definition_must_be_a_mapping() -> None:
    with pytest.raises(InvalidDefinition, match="JSON object"):
        validate_definition(["image"])  # type: ignore[arg-type]
    with pytest.raises(InvalidDefinition, match="keys must be strings"):
        validate_definition({**HELLO, 1: "x"})  # type: ignore[dict-item]


def test_null_equals_absent() -> None:
    assert validate_definition({**HELLO, "build": None, "env": None, "inputs": None}) == HELLO
    assert validate_definition({"image": None, "build": {"dockerfile": "FROM a"}}) == {
        "build": {"dockerfile": "FROM a"}
    }


@pytest.mark.parametrize(
    ("field", "name", "words"),
    [
        ("inputs", "../x", "'..'"),
        ("inputs", "a/./b", "'.'"),
        ("inputs", "a//b", "empty segment"),
        ("inputs", "a/", "empty segment"),
        ("inputs", "/abs", "absolute"),
        ("inputs", "a\\b", "backslash"),
        ("inputs", "a\x00b", "control character"),
        ("inputs", "a\nb", "control character"),
        ("inputs", "x" * 256, "255"),
        ("inputs", "/".join(["abcdefgh"] * 120), "1024"),
        ("inputs", "/".join(["a"] * 33), "32"),
        ("configFiles", "/", "root"),
        ("configFiles", "/inputs/x", "/inputs"),
        ("configFiles", "/outputs", "/outputs"),
        ("configFiles", "/proc/self", "/proc"),
        ("configFiles", "/sys/x", "/sys"),
        ("configFiles", "/dev/null", "/dev"),
        ("configFiles", "/etc/../inputs/x", "'..'"),
        ("configFiles", "/tmp", "/tmp"),
        ("configFiles", "/sbin/docker-init", "the container runtime writes itself"),
        ("configFiles", "/etc/hosts", "the container runtime writes itself"),
        ("configFiles", "/etc/resolv.conf", "the container runtime writes itself"),
    ],
)
def test_invalid_file_names(field: str, name: str, words: str) -> None:
    with pytest.raises(InvalidPath) as err:
        validate_definition({**HELLO, field: {name: "x"}})
    assert err.value.path == name
    assert words in str(err.value)
    assert f"in {field}[" in str(err.value)


def test_validate_relative_path() -> None:
    assert validate_relative_path("a/b/c.txt", "outputs") == "a/b/c.txt"
    assert validate_relative_path("é/ü.txt", "outputs") == "é/ü.txt"
    assert validate_relative_path("x" * 255, "outputs") == "x" * 255
    assert validate_relative_path("/".join(["a"] * 32), "outputs")
    with pytest.raises(InvalidPath, match="empty"):
        validate_relative_path("", "outputs")
    with pytest.raises(InvalidPath, match=r"in outputs"):
        validate_relative_path("..", "outputs")


def test_build_paths() -> None:
    ok = {"build": {"dockerfile": "FROM a", "buildContext": ".", "filename": "d/Dockerfile"}}
    assert validate_definition(ok) == ok
    with pytest.raises(InvalidPath, match=r"build\.filename"):
        validate_definition({"build": {"dockerfile": "F", "filename": "../Dockerfile"}})
    with pytest.raises(InvalidPath, match=r"build\.buildContext"):
        validate_definition({"build": {"context": "https://x/y", "buildContext": "/abs"}})


def test_limits() -> None:
    small = DefinitionLimits(
        max_definition_bytes=2000,
        max_inline_bytes=100,
        max_total_inline_bytes=150,
        max_files=3,
        max_env=2,
        max_duration_ms=60_000,
    )
    with pytest.raises(InvalidDefinition, match=r"101 bytes, over the limit of 100") as err:
        validate_definition({**HELLO, "inputs": {"a": "x" * 101}}, small)
    assert err.value.field == 'inputs["a"]'
    with pytest.raises(InvalidDefinition, match=r"160 bytes in all, over the limit of 150"):
        validate_definition(
            {**HELLO, "inputs": {"a": "x" * 80}, "configFiles": {"b": "y" * 80}}, small
        )
    # a base64 ref counts its decoded bytes, a json ref its serialisation
    validate_definition({**HELLO, "inputs": {"a": {"type": "base64", "value": "eHh4" * 33}}}, small)
    with pytest.raises(InvalidDefinition, match=r"4 files, over the limit of 3"):
        validate_definition(
            {**HELLO, "inputs": {"a": "", "b": ""}, "configFiles": {"c": "", "d": ""}}, small
        )
    with pytest.raises(InvalidDefinition, match=r"3 variables, over the limit of 2"):
        validate_definition({**HELLO, "env": {"A": "", "B": "", "C": ""}}, small)
    with pytest.raises(InvalidDefinition, match=r"120000 ms, over the limit of 60000 ms"):
        validate_definition({**HELLO, "maxDuration": "2m"}, small)
    with pytest.raises(InvalidDefinition, match=r"over the limit of 2000 bytes") as err:
        validate_definition({**HELLO, "notes": "n" * 2000}, small)
    assert str(err.value).startswith("the job definition is 20")
    # refs by reference do not count as inline bytes
    many = {f"f{i}": {"type": "blob", "value": SHA} for i in range(3)}
    validate_definition({**HELLO, "inputs": many}, small)


def test_default_limits() -> None:
    limits = DefinitionLimits()
    assert limits.max_definition_bytes == 256 * 1024
    assert limits.max_inline_bytes == 64 * 1024
    assert limits.max_total_inline_bytes == 192 * 1024
    assert (limits.max_files, limits.max_env) == (1000, 256)
    assert limits.max_duration_ms == 30 * 86_400_000
    validate_definition({**HELLO, "inputs": {"a": "x" * 65536}})
    with pytest.raises(InvalidDefinition, match="65537 bytes"):
        validate_definition({**HELLO, "inputs": {"a": "x" * 65537}})
    validate_definition({**HELLO, "maxDuration": "30d"})
    with pytest.raises(InvalidDefinition, match="files, over the limit of 1000"):
        validate_definition({**HELLO, "inputs": {f"f{i}": "" for i in range(1001)}})


# ---------------------------------------------------------------------------------------------
# durations and sizes


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("10s", 10_000),
        ("20m", 1_200_000),
        ("1h", 3_600_000),
        ("1h30m", 5_400_000),
        ("1h 30m", 5_400_000),
        ("500ms", 500),
        ("1.5h", 5_400_000),
        ("2d", 172_800_000),
        ("0s", 0),
        (60, 60_000),
        (2.0, 2_000),
    ],
)
def test_parse_duration(value: str | int, ms: int) -> None:
    assert parse_duration_ms(value, "maxDuration") == ms


@pytest.mark.parametrize("value", ["", "10", "s", "10x", "-1s", "1h-", "1M", -1, True, 1.5, None])
def test_parse_duration_invalid(value: Any) -> None:
    with pytest.raises(InvalidDefinition, match="definition field 'maxDuration'"):
        parse_duration_ms(value, "maxDuration")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("2g", 2 * 1024**3),
        ("2GiB", 2 * 1024**3),
        ("2GB", 2 * 1024**3),
        ("512mb", 512 * 1024**2),
        ("512m", 512 * 1024**2),
        ("64k", 64 * 1024),
        ("64Ki", 64 * 1024),
        ("1t", 1024**4),
        ("1.5g", 3 * 1024**3 // 2),
        ("100", 100),
        ("100b", 100),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size(value: str | int, size: int) -> None:
    assert parse_size_bytes(value, "shmSize") == size


@pytest.mark.parametrize("value", ["", "g", "2q", "2 gigs", "-1g", "1i", -5, 1.5, True, None])
def test_parse_size_invalid(value: Any) -> None:
    with pytest.raises(InvalidDefinition, match="definition field 'shmSize'"):
        parse_size_bytes(value, "shmSize")


# ---------------------------------------------------------------------------------------------
# data references


def test_dataref_json_round_trip() -> None:
    ref = DataRef.from_json({"value": SHA, "type": "blob", "size": 3, "extra": 1}, "inputs")
    assert ref == DataRef("blob", SHA, None, 3)
    assert ref.to_json() == {"value": SHA, "type": "blob", "size": 3}
    assert not ref.is_inline
    hashed = DataRef.from_json({"value": "x", "hash": SHA}, "inputs")
    assert hashed.to_json() == {"value": "x", "type": "utf8", "hash": SHA}
    assert DataRef.from_json(hashed.to_json(), "inputs") == hashed


def test_inline_bytes() -> None:
    assert DataRef("utf8", "héllo").inline_bytes() == "héllo".encode()
    assert DataRef("base64", "aGVsbG8=").inline_bytes() == b"hello"
    doc = {"b": 1, "a": ["é", None]}
    assert DataRef("json", doc).inline_bytes() == '{"a":["é",null],"b":1}'.encode()
    with pytest.raises(ValueError, match="not inline"):
        DataRef("url", "https://x/y").inline_bytes()


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        (
            "data:text/x-uri;charset=utf-8,https%3A%2F%2Fmetapage.io%2Ff%2Fbc10",
            DataRef("url", "https://metapage.io/f/bc10"),
        ),
        (
            "data:text/x-uri;type=Uint8Array;charset=utf-8,https%3A%2F%2Fc.io%2Ff%2F9f",
            DataRef("url", "https://c.io/f/9f"),
        ),
        ("data:application/octet-stream;base64,aGVsbG8=", DataRef("base64", "aGVsbG8=")),
        ("data:application/json;charset=utf-8,%7B%22a%22%3A1%7D", DataRef("json", {"a": 1})),
        ("data:application/json;charset=utf-8,not-json", DataRef("utf8", "not-json")),
        ("data:text/plain;charset=utf-8,hello%20world", DataRef("utf8", "hello world")),
        ("data:text/plain;charset=utf-8,", DataRef("utf8", "")),
        ("just a string", DataRef("utf8", "just a string")),
        ("https://example.com", DataRef("utf8", "https://example.com")),
        ("data:no-comma", DataRef("utf8", "data:no-comma")),
    ],
)
def test_dataref_string_forms(text: str, ref: DataRef) -> None:
    assert DataRef.from_json(text, "inputs") == ref


def test_dataref_data_url_is_validated() -> None:
    with pytest.raises(InvalidDefinition, match=r"inputs\[\"a\"\]\.value"):
        validate_definition({**HELLO, "inputs": {"a": "data:text/x-uri,ftp%3A%2F%2Fx"}})


# ---------------------------------------------------------------------------------------------
# typed view


@pytest.mark.parametrize(
    ("command", "env", "argv"),
    [
        ('echo "hello world"', {}, ("echo", "hello world")),
        ("echo $FOO", {"FOO": "bar"}, ("echo", "bar")),
        ("echo ${FOO}x", {"FOO": "bar"}, ("echo", "barx")),
        ("echo $FOO", {"FOO": "a b"}, ("echo", "a b")),
        ("echo $FOO", {"FOO": "it's"}, ("echo", "it's")),
        ('echo "$FOO"', {"FOO": 'say "hi" \\o/'}, ("echo", 'say "hi" \\o/')),
        ("echo '$FOO'", {"FOO": "bar"}, ("echo", "$FOO")),
        ("echo \\$FOO", {"FOO": "bar"}, ("echo", "$FOO")),
        ("echo $NOPE", {}, ("echo", "$NOPE")),
        ("sh -c 'ls | wc -l'", {}, ("sh", "-c", "ls | wc -l")),
        ("ls | wc", {}, ("ls", "|", "wc")),
        (["echo", "$FOO"], {"FOO": "bar"}, ("echo", "$FOO")),
        ("", {}, ()),
    ],
)
def test_split_command(command: Any, env: dict[str, str], argv: tuple[str, ...]) -> None:
    assert split_command(command, env) == argv


def test_jobspec_from_definition() -> None:
    spec = JobSpec.from_definition(
        {
            "image": "python:3.12",
            "command": "python -c 'print($N)' $N",
            "entrypoint": ["/bin/sh", "-c"],
            "env": {"N": "3"},
            "workdir": "/w",
            "shmSize": "64m",
            "inputs": {"a.txt": "hi", "b": {"type": "blob", "value": SHA, "size": 2}},
            "configFiles": {"/etc/x": {"value": "1"}},
            "maxDuration": "1h",
            "tags": ["t"],
            "requirements": {"cpus": 2, "gpus": 1, "memory": "1g", "maxDuration": "10m"},
            "v": 2,
        }
    )
    assert spec.image == "python:3.12"
    assert spec.build is None
    assert spec.command == ("python", "-c", "print($N)", "3")
    assert spec.entrypoint == ("/bin/sh", "-c")
    assert spec.env == {"N": "3"}
    assert spec.workdir == "/w"
    assert spec.shm_size == 64 * 1024**2
    assert spec.inputs == {"a.txt": DataRef("utf8", "hi"), "b": DataRef("blob", SHA, size=2)}
    assert spec.config_files == {"/etc/x": DataRef("utf8", "1")}
    assert spec.max_duration_ms == 600_000
    assert spec.tags == ("t",)
    assert (spec.cpus, spec.gpus, spec.memory, spec.v) == (2.0, 1, 1024**3, 2)
    assert spec.image_class == "gpu"


def test_jobspec_defaults_and_build() -> None:
    spec = JobSpec.from_definition(
        {"build": {"context": "https://x/y.tar.gz", "buildArgs": ["A=1", "B=x=y"]}, "command": ""}
    )
    assert spec.image is None
    assert spec.build == BuildSpec(context="https://x/y.tar.gz", build_args={"A": "1", "B": "x=y"})
    assert spec.command is None and spec.entrypoint is None
    assert (spec.cpus, spec.gpus, spec.memory, spec.max_duration_ms) == (None, 0, None, None)
    assert spec.image_class == "cpu"
    with pytest.raises(InvalidInput):
        JobSpec.from_definition({"image": ""})


@pytest.mark.parametrize(
    ("d", "cls"),
    [
        (HELLO, "cpu"),
        ({**HELLO, "requirements": {"gpus": 0}}, "cpu"),
        ({**HELLO, "requirements": {"gpus": 2}}, "gpu"),
        ({**HELLO, "requirements": {"gpus": 1.0}}, "gpu"),
        ({**HELLO, "requirements": {"gpus": None}}, "cpu"),
        ({**HELLO, "requirements": "x"}, "cpu"),
    ],
)
def test_image_class(d: dict[str, Any], cls: str) -> None:
    assert image_class(d) == cls


def test_definition_text_is_json() -> None:
    # the validated definition round-trips through JSON unchanged
    d = validate_definition({**HELLO, "inputs": {"j": {"type": "json", "value": {"a": [1, 2.5]}}}})
    assert json.loads(json.dumps(d)) == d


_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(_json_values)
def test_the_fast_canonical_json_is_rfc8785(value: Any) -> None:
    """The job id's canonical JSON takes the C encoder when it gives RFC 8785's bytes:
    whatever the value (floats, huge integers, non-ASCII keys, lone surrogates), the bytes
    are the rfc8785 library's, or both refuse."""
    from asman.log.definition import _jcs

    try:
        expected: bytes | None = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        expected = None
    try:
        got: bytes | None = _jcs(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        got = None
    assert got == expected


@pytest.mark.parametrize(
    "value",
    [{"a": "\ud800"}, {"\udfff": 1}, {"b": 2**53}, {"é": 1, "e": 2}, {"😀": 1, "\uffff": 2}, 1.5],
)
def test_the_fast_canonical_json_leaves_the_hard_cases_to_rfc8785(value: Any) -> None:
    from asman.log.definition import _jcs

    try:
        expected: bytes | None = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        expected = None
    try:
        got: bytes | None = _jcs(value)
    except (rfc8785.CanonicalizationError, TypeError, ValueError):
        got = None
    assert got == expected
