"""Multi-step definitions: validation of steps, volumes, outputPaths and s3 refs, and the id."""

from __future__ import annotations

from typing import Any

import pytest

from asman.errors import InvalidInput
from asman.log.definition import JobSpec, job_id, validate_definition

IMAGE = "alpine:3.20"
TWO = {
    "volumes": ["/data"],
    "steps": [
        {"image": IMAGE, "command": ["sh", "-c", "echo 1 > /data/x"]},
        {"image": "busybox:1", "command": "cat /data/x", "stdout": "/data/out.txt"},
    ],
    "outputPaths": [{"path": "/data/out.txt", "url": "s3://bucket/out.txt"}],
}


def test_steps_are_part_of_the_id_and_a_plain_definition_keeps_its_own() -> None:
    plain = {"image": IMAGE, "command": "echo hi"}
    assert job_id(plain) == job_id({**plain, "steps": None, "volumes": [], "outputPaths": None})
    assert job_id(TWO) == job_id(dict(TWO))
    changed = {**TWO, "steps": [TWO["steps"][0], {**TWO["steps"][1], "ignoreError": True}]}
    assert job_id(changed) != job_id(TWO)
    assert job_id({**TWO, "volumes": ["/data", "/more"]}) != job_id(TWO)


def test_a_valid_multistep_definition_gives_typed_steps() -> None:
    clean = validate_definition(TWO)
    spec = JobSpec.from_definition(clean)
    assert spec.image is None
    assert [s.image for s in spec.steps] == [IMAGE, "busybox:1"]
    assert spec.steps[1].command == ("cat", "/data/x")
    assert spec.steps[1].stdout == "/data/out.txt"
    assert spec.volumes == ("/data",)
    assert spec.output_paths[0].url == "s3://bucket/out.txt"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"volumes": ["/proc/x"]}, "/proc"),
        ({"volumes": ["/dev"]}, "/dev"),
        ({"volumes": ["/sys/fs"]}, "/sys"),
        ({"volumes": ["/"]}, "root folder"),
        ({"volumes": ["/data/../etc"]}, "'..'"),
        ({"volumes": ["data"]}, "absolute"),
        ({"volumes": ["/inputs/x"]}, "/inputs"),
        ({"volumes": ["/tmp"]}, "/tmp"),
        ({"volumes": ["/sbin/docker-init"]}, "runtime writes itself"),
        ({"outputPaths": [{"path": "/etc/hosts"}]}, "runtime writes itself"),
        ({"outputPaths": [{"path": "/data/*.txt"}]}, "pathPrefix"),
        ({"outputPaths": [{"path": "/data/x", "url": "http://h/x"}]}, "s3://"),
        ({"outputPaths": [{"path": "/data/x", "url": "s3://b/../x"}]}, "'..'"),
        ({"outputPaths": [{"path": "/data/x", "size": 3}]}, "unknown keys"),
        ({"steps": [], "image": IMAGE}, "non-empty"),
        ({"steps": [{"command": "true"}]}, "image"),
        ({"steps": [{"image": IMAGE, "stdout": "/elsewhere/o.txt"}]}, "no folder the steps"),
        ({"steps": [{"image": IMAGE, "stdin": "/proc/self/environ"}]}, "/proc"),
        ({"steps": [{"image": IMAGE, "ignoreError": "yes"}]}, "true or false"),
        ({"steps": [{"image": IMAGE, "gpus": 1}]}, "unknown keys"),
        ({"steps": [{"image": IMAGE, "workdir": "rel"}]}, "absolute"),
        ({"inputs": {"x": {"type": "s3", "value": "http://h/x"}}}, "s3://bucket/key"),
        ({"inputs": {"x": {"type": "s3", "value": "s3://b/a/../x"}}}, "'..'"),
    ],
)
def test_bad_multistep_fields_get_one_line_saying_what_is_wrong(
    change: dict[str, Any], words: str
) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_definition({**TWO, **change})
    message = str(err.value)
    assert words in message and "\n" not in message, message


@pytest.mark.parametrize("path", ["/out.txt", "/tmp/out.txt", "/*.txt", "/tmp/*.txt"])
def test_an_output_whose_folder_is_root_or_tmp_is_refused(path: str) -> None:
    """Its folder would be bound writable into every step: the whole root, or over the
    container's own /tmp (a capped tmpfs)."""
    with pytest.raises(InvalidInput) as err:
        validate_definition({**TWO, "outputPaths": [{"path": path, "pathPrefix": "/"}]})
    assert "folder" in str(err.value), err.value
