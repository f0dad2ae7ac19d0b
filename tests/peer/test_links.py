"""Browser links in compute-queues' URL-hash format."""

from __future__ import annotations

import base64
import json
import urllib.parse
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asman.errors import InvalidDefinition, InvalidInput
from asman.log.definition import job_id
from asman.peer import links
from asman.peer.links import (
    decode_hash_param,
    encode_hash_param,
    encode_uri_component,
    job_link,
    parse_link,
)

# compute-queues README, re-encoded in reference/compute-queues.md §2
EXAMPLE_JOB = (
    "JTdCJTIyY29tbWFuZCUyMiUzQSUyMmVjaG8lMjAlNUMlMjJoZWxsbyUyMHdvcmxkJTVDJTIyJTIyJTJDJTIyaW1hZ2Ul"
    "MjIlM0ElMjJhbHBpbmUlM0EzLjE5LjElMjIlN0Q%3D"
)
EXAMPLE_URL = (
    f"https://container.mtfm.io/#?job={EXAMPLE_JOB}&ignoreQueueOverride=true&queue=public1"
)
HELLO = {"command": 'echo "hello world"', "image": "alpine:3.19.1"}
HELLO_ID = "9a684c59f4270fa102f102d2aafe92d5e78ad285116f02d845e5dabbfb0ba873"


def test_public_names() -> None:
    for name in links.__all__:
        assert hasattr(links, name)


def test_worked_example_decodes_and_reencodes_identically() -> None:
    assert decode_hash_param(EXAMPLE_JOB) == HELLO
    assert encode_hash_param(HELLO) == EXAMPLE_JOB
    inner = base64.b64decode(urllib.parse.unquote(EXAMPLE_JOB)).decode()
    assert inner == (
        "%7B%22command%22%3A%22echo%20%5C%22hello%20world%5C%22%22%2C%22image%22%3A%22alpine"
        "%3A3.19.1%22%7D"
    )


def test_worked_example_link_has_the_compute_queues_id() -> None:
    definition, queue = parse_link(EXAMPLE_URL)
    assert definition == HELLO
    assert queue == "public1"
    assert job_id(definition) == HELLO_ID


def test_job_link_writes_the_example() -> None:
    link = job_link("https://container.mtfm.io", HELLO, queue="public1")
    assert link == f"https://container.mtfm.io/#?job={EXAMPLE_JOB}&queue=public1"
    assert job_link("https://container.mtfm.io/", HELLO, "public1") == link
    assert job_link("https://container.mtfm.io/#?old=1", HELLO, "public1") == link
    assert job_link("https://h", HELLO) == f"https://h/#?job={EXAMPLE_JOB}"


@pytest.mark.parametrize(
    ("text", "encoded"),
    [
        ("abcXYZ019", "abcXYZ019"),
        ("-_.!~*'()", "-_.!~*'()"),
        (
            ' "#$%&+,/:;<=>?@[\\]^`{|}',
            "%20%22%23%24%25%26%2B%2C%2F%3A%3B%3C%3D%3E%3F%40%5B%5C%5D%5E%60%7B%7C%7D",
        ),
        ("é€😀", "%C3%A9%E2%82%AC%F0%9F%98%80"),
    ],
)
def test_encode_uri_component_matches_javascript(text: str, encoded: str) -> None:
    assert encode_uri_component(text) == encoded


def test_encode_uri_component_rejects_lone_surrogates() -> None:
    with pytest.raises(InvalidInput):
        encode_uri_component("\ud800")


def test_encode_uses_stable_json() -> None:
    value = encode_hash_param({"b": [1, 2.0, None], "a": {"y": 1, "x": "é"}})
    inner = urllib.parse.unquote(base64.b64decode(urllib.parse.unquote(value)).decode())
    assert inner == '{"a":{"x":"é","y":1},"b":[1,2,null]}'


@pytest.mark.parametrize(
    "form",
    [
        lambda v: v,  # as written: padding as %3D
        lambda v: v.replace("%3D", "="),  # padding as '='
        lambda v: v.replace("%3D", ""),  # no padding
        lambda v: urllib.parse.quote(v.replace("%3D", "="), safe=""),  # fully URL-encoded
    ],
)
def test_decode_accepts_padding_forms(form: Any) -> None:
    assert decode_hash_param(form(EXAMPLE_JOB)) == HELLO


def test_decode_accepts_single_encoded_form() -> None:
    doc = {"foo": "bar", "n": 42, "pct": "100%", "é": "ü"}
    single = base64.b64encode(json.dumps(doc, ensure_ascii=False).encode()).decode()
    assert decode_hash_param(single) == doc
    latin1 = base64.b64encode('{"a":"é"}'.encode("latin-1")).decode()  # what btoa() makes
    assert decode_hash_param(latin1) == {"a": "é"}
    assert decode_hash_param(base64.b64encode(b"42").decode()) == 42


@pytest.mark.parametrize("bad", ["!!!", "abcde", base64.b64encode(b"not json").decode()])
def test_decode_rejects_garbage(bad: str) -> None:
    with pytest.raises(InvalidInput, match="hash parameter"):
        decode_hash_param(bad)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.text(st.characters(codec="utf-8"), max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.text(st.characters(codec="utf-8"), max_size=5),
            inner,
            max_size=3,
        )
    ),
    max_leaves=10,
)


@settings(max_examples=150)
@given(json_values)
def test_hash_param_round_trip(value: Any) -> None:
    encoded = encode_hash_param(value)
    assert decode_hash_param(encoded) == value
    # safe inside a hash query: no separators, no characters a URL would re-encode
    assert not set(encoded) & set('&#? "<>`')


def test_link_round_trip_with_config_files_as_inputs_param() -> None:
    d = {
        "image": "python:3.12",
        "command": "python /inputs/main.py",
        "env": {"A": "1"},
        "configFiles": {
            "main.py": {"type": "utf8", "value": "print('hi')"},
            "cfg/x.ini": {"type": "utf8", "value": "a=1 & b=2"},
        },
        "requirements": {"cpus": 2},
    }
    link = job_link("https://container.mtfm.io", d, queue="q1")
    params = link.split("#?", 1)[1].split("&")
    assert [p.split("=", 1)[0] for p in params] == ["inputs", "job", "queue"]
    assert "configFiles" not in decode_hash_param(params[1].split("=", 1)[1])
    back, queue = parse_link(link)
    assert back == d
    assert queue == "q1"
    assert job_id(back) == job_id(d)


def test_link_keeps_config_files_in_job_when_not_plain_text() -> None:
    d = {
        "image": "a",
        "configFiles": {
            "t.txt": {"type": "utf8", "value": "x"},
            "b.bin": {"type": "base64", "value": "eHh4"},
        },
    }
    link = job_link("https://h", d)
    assert "inputs=" not in link
    back, queue = parse_link(link)
    assert back == d and queue is None
    # implicit type: moving it would change the id, so it stays in job
    d2 = {"image": "a", "configFiles": {"t.txt": {"value": "x"}}}
    assert parse_link(job_link("https://h", d2))[0] == d2
    with pytest.raises(InvalidDefinition, match="configFiles"):
        job_link("https://h", d, inputs={"extra.txt": "y"})


def test_link_inputs_argument_and_definition_inputs() -> None:
    d = {"image": "a", "inputs": {"in.txt": {"value": "dropped"}}}
    link = job_link("https://h", d, inputs={"x.txt": "hello"})
    back, _ = parse_link(link)
    assert back == {"image": "a", "configFiles": {"x.txt": {"type": "utf8", "value": "hello"}}}


def test_parse_link_merges_unknown_params_into_env() -> None:
    job = encode_hash_param(
        {"image": "a", "command": "echo ${NAME} ${NAME}", "env": {"A": "1"}, "inputs": {"x": "y"}}
    )
    url = (
        f"https://h/#?autostart=true&channel=c&mp-page=p&mp_user=u&NAME=J%C3%BCrgen%20K&B=2"
        f"&job={job}&maxJobDuration=1h&queue=q&resolverefs=true&terminal=true&control=x"
    )
    definition, queue = parse_link(url)
    assert queue == "q"
    assert definition == {
        "image": "a",
        # the browser replaces the first occurrence only (String.prototype.replace)
        "command": "echo Jürgen K ${NAME}",
        "env": {"A": "1", "NAME": "Jürgen K", "B": "2"},
    }


def test_parse_link_substitutes_build_context() -> None:
    job = encode_hash_param({"build": {"context": "https://github.com/o/r/tree/${REF}"}})
    definition, _ = parse_link(f"https://h/#?REF=v1&job={job}")
    assert definition["build"]["context"] == "https://github.com/o/r/tree/v1"


def test_parse_link_inputs_replace_config_files() -> None:
    job = encode_hash_param({"image": "a", "configFiles": {"old": {"value": "x"}}})
    inputs = encode_hash_param({"new.txt": "text"})
    definition, _ = parse_link(f"https://h/#?inputs={inputs}&job={job}")
    assert definition["configFiles"] == {"new.txt": {"type": "utf8", "value": "text"}}


@pytest.mark.parametrize(
    ("extra", "queue"),
    [
        ("&queue=a&queueOverride=b", "b"),
        ("&queue=a&queueOverride=b&ignoreQueueOverride=true", "a"),
        ("&queue=https%3A%2F%2Fhost%2Fq1", "https://host/q1"),
        ("", None),
    ],
)
def test_parse_link_queue(extra: str, queue: str | None) -> None:
    assert parse_link(f"https://h/#?job={EXAMPLE_JOB}{extra}")[1] == queue


def test_queue_urls_survive_a_round_trip() -> None:
    link = job_link("https://h", HELLO, queue="https://host/q1")
    assert parse_link(link) == (HELLO, "https://host/q1")


def test_parse_link_errors() -> None:
    with pytest.raises(InvalidInput, match="short form"):
        parse_link("https://container.mtfm.io/j/abc123#?queue=q")
    with pytest.raises(InvalidInput, match="no `job` parameter"):
        parse_link("https://container.mtfm.io/#?queue=q")
    with pytest.raises(InvalidInput, match="not a JSON object"):
        parse_link(f"https://h/#?job={encode_hash_param([1])}")
