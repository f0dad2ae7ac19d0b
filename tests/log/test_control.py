"""A submission's ``control`` on the log (real nats-server): it goes with the job, is never
part of it, and only the job's submitter may change it."""

from __future__ import annotations

import pytest
from adversary import MakeLog

from asman.errors import InvalidInput
from asman.log import jobs
from asman.log.control import callback_of, namespace_of, validate_control
from asman.log.definition import job_id

DEF = {"image": "asman/busybox:local", "command": "echo control"}


def hooks(url: str, payload: object = None) -> dict[str, object]:
    finished: dict[str, object] = {"url": url}
    if payload is not None:
        finished["payload"] = payload
    return {"namespace": "ns", "callbacks": {"finished": finished}}


async def test_the_control_goes_with_the_job_and_is_not_part_of_it(make_log: MakeLog) -> None:
    client, other = await make_log(), await make_log()
    first = hooks("https://example.org/a", {"n": 1.5})
    sub = await jobs.submit(client, "ctl", DEF, control=first)
    assert sub.created and sub.job_id == job_id(DEF)
    state = await jobs.read_job(other, "ctl", sub.job_id)
    assert state is not None and state.control == first
    cb = callback_of(state.control, "finished")
    assert cb is not None and (cb.url, cb.payload) == ("https://example.org/a", {"n": 1.5})
    assert namespace_of(state.control) == "ns" and namespace_of({}) == "_"
    # a resubmission of the queued job with another control is the same job; the first
    # control stays
    again = await jobs.submit(other, "ctl", DEF, control=hooks("https://example.org/b"))
    assert again.job_id == sub.job_id and not again.created
    assert again.state.control == first


async def test_only_the_submitter_changes_the_control_of_a_re_run(make_log: MakeLog) -> None:
    client, stranger = await make_log(), await make_log()
    sub = await jobs.submit(client, "ctl", DEF, control=hooks("https://example.org/a"))
    await jobs.cancel(client, "ctl", sub.job_id)  # finished without a result: anyone re-runs
    rerun = await jobs.submit(stranger, "ctl", DEF, control=hooks("https://evil.example/x"))
    assert rerun.requeued
    assert rerun.state.control == hooks("https://example.org/a")  # not the stranger's
    await jobs.cancel(client, "ctl", sub.job_id)
    mine = await jobs.submit(client, "ctl", DEF, control=hooks("https://example.org/new"))
    assert mine.requeued and mine.state.control == hooks("https://example.org/new")


@pytest.mark.parametrize(
    ("control", "says"),
    [
        ({"callbacks": {"queued": {"url": "file:///etc/passwd"}}}, "callbacks.queued.url"),
        ({"callbacks": {"queued": {"url": "http://a b/"}}}, "absolute http"),
        ({"callbacks": {"queued": {"url": "http://x:99999/"}}}, "not a URL"),
        ({"callbacks": {"queued": {"url": "https://x/", "secret": 1}}}, "unknown fields"),
        ({"callbacks": {"queued": {"url": "https://x/", "payload": float("nan")}}}, "NaN"),
        ({"callbacks": {"queued": {"url": "https://x/" + "a" * 3000}}}, "over the limit"),
        ({"callbacks": {"finished": {"url": "https://x/", "payload": "p" * 20_000}}}, "16384"),
        ({"namespace": ""}, "control.namespace"),
        ([], "control must be an object"),
    ],
)
def test_a_bad_control_says_what_is_wrong(control: object, says: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_control(control)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_compute_queues_unused_fields_are_accepted_and_dropped() -> None:
    assert validate_control({"maxDuration": "1m", "outputs": {"nhost": {}}}) == {}
    assert validate_control(None) == {} and validate_control({}) == {}


async def test_the_namespace_and_control_namespace_are_one_on_the_log(make_log: MakeLog) -> None:
    """``submit(namespace=…)`` and ``control.namespace`` name one namespace: the job is held
    for it and its control says it; two different ones are refused before any append."""
    client = await make_log()
    callbacks = {"callbacks": hooks("https://x.org/")["callbacks"]}
    sub = await jobs.submit(client, "ctl-ns", DEF, namespace="a", control=callbacks)
    assert sub.state.control == callbacks | {"namespace": "a"}
    assert sub.state.namespaces == ("a",) and sub.namespace == "a"
    other = {**DEF, "command": "echo other"}
    with pytest.raises(InvalidInput, match=r"namespace 'b' and control\.namespace 'ns' differ"):
        await jobs.submit(client, "ctl-ns", other, namespace="b", control=hooks("https://x.org/"))
    assert await jobs.read_job(client, "ctl-ns", job_id(other)) is None
