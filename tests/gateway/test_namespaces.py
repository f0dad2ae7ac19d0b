"""compute-queues' namespace cases (reference §8: ``namespace_basics``,
``namespace_remove_one``, ``namespace_star_is_all``, ``namespace_replacements``), rewritten
against Asman's compute-queues routes with a real gateway, a real worker and Docker; then
``/j/<id>/copy``, the compute-queues views of a queue's listing, and namespaces through
Asman's own ``/api/v1``."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import pytest
from faults import running_containers, until, wait_removed
from gatewaystack import IMAGE, Gateway, Stack

from asman.log import subjects
from asman.log.events import JobState
from asman.log.namespaces import ReplaceGrace

Q = "nsq"
UNKNOWN = "c" * 64


def sleeper(seconds: int = 30) -> dict[str, Any]:
    """compute-queues' ``sleep 30.<rand>``: a job that runs until it is stopped."""
    return {"image": IMAGE, "command": f"sleep {seconds}.{random.randrange(10**6)}"}


def new_namespaces(n: int = 3) -> list[str]:
    return sorted(f"namespace-{random.randrange(10**6)}" for _ in range(n))


async def submit_in(gw: Gateway, queue: str, definition: dict[str, Any], namespace: str) -> str:
    body = {"definition": definition, "control": {"namespace": namespace}}
    status, got = await gw.json("POST", f"/q/{queue}", json=body)
    assert status == 200 and got["success"] is True, got
    return str(got["jobId"])


async def queue_jobs(gw: Gateway, queue: str) -> dict[str, Any]:
    """compute-queues' test helper ``queueJobs``: ``GET /q/<queue>`` → data."""
    status, got = await gw.json("GET", f"/q/{queue}")
    assert status == 200, got
    return dict(got["data"])


async def namespaces_of(gw: Gateway, queue: str, job: str) -> list[str]:
    status, got = await gw.json("GET", f"/q/{queue}/j/{job}/namespaces.json")
    assert status == 200, got
    return list(got["data"])


async def cancel(gw: Gateway, queue: str, job: str, namespace: str | None) -> dict[str, Any]:
    """compute-queues' ``cancelJobOnQueue``: the namespace in the query (none: ``_``)."""
    params = {"message": "from-namespace-test"}
    if namespace is not None:
        params["namespace"] = namespace
    status, got = await gw.json("POST", f"/q/{queue}/j/{job}/cancel", params=params)
    assert status == 200, got
    return dict(got)


def running(state: JobState) -> bool:
    return state.started_ms is not None


@pytest.mark.docker
async def test_namespace_basics(stack: Stack, busybox_image: str) -> None:
    """Submit the same job from three namespaces: one job, listed with the three; cancel one
    namespace and the two others remain."""
    gw = await stack.gateway()
    await stack.worker(Q)
    names = new_namespaces()
    definition = sleeper()
    ids = {await submit_in(gw, Q, definition, n) for n in names}
    assert len(ids) == 1
    (jid,) = ids
    assert sorted(set((await queue_jobs(gw, Q))[jid]["namespaces"])) == names
    assert await namespaces_of(gw, Q, jid) == names

    answer = await cancel(gw, Q, jid, names[-1])
    assert answer == {"success": True, "jobId": jid, "namespace": names[-1]}
    assert sorted((await queue_jobs(gw, Q))[jid]["namespaces"]) == names[:-1]
    assert await namespaces_of(gw, Q, jid) == names[:-1]

    # namespace_star_is_all: '*' removes every namespace, and the job with them
    assert (await cancel(gw, Q, jid, "*"))["success"] is True
    assert await namespaces_of(gw, Q, jid) == []
    done = await gw.wait_job(Q, jid)
    assert (done["cqState"], done["cqFinishedReason"]) == ("Finished", "Cancelled")


@pytest.mark.docker
async def test_namespace_remove_one(stack: Stack, busybox_image: str) -> None:
    """Cancel one namespace of a running job held by three: the job keeps running, its
    container with it, and lists the two others; the path form of cancel names it too."""
    gw = await stack.gateway()
    await stack.worker(Q)
    peer = await stack.peer()
    names = new_namespaces()
    definition = sleeper()
    for n in names:
        jid = await submit_in(gw, Q, definition, n)
    await until(peer, Q, jid, running)
    containers = await asyncio.to_thread(running_containers, jid)

    to_remove, kept = names[-1], names[:-1]
    status, got = await gw.json("POST", f"/q/{Q}/j/{jid}/{to_remove}/cancel")
    assert (status, got) == (200, {"success": True, "jobId": jid, "namespace": to_remove})
    listed = (await queue_jobs(gw, Q))[jid]
    assert listed["state"] == "Running" and sorted(listed["namespaces"]) == kept
    view = (await gw.json("GET", f"/api/v1/queues/{Q}/jobs/{jid}"))[1]
    assert view["state"] == "running" and view["cancelRequested"] is False
    assert view["namespaces"] == kept
    assert await asyncio.to_thread(running_containers, jid) == containers

    # the last namespaces go: the job is cancelled, its container stopped and removed
    since = time.time() - 1
    for n in kept:
        await cancel(gw, Q, jid, n)
    done = await gw.wait_job(Q, jid)
    assert done["reason"] == "cancelled"
    await asyncio.to_thread(wait_removed, containers, since)
    # compute-queues hides cancelled jobs from the queue's listing; Asman's API keeps them
    assert jid not in await queue_jobs(gw, Q)
    _, native = await gw.json("GET", f"/api/v1/queues/{Q}/jobs")
    assert [j["reason"] for j in native["jobs"] if j["jobId"] == jid] == ["cancelled"]
    # and a cancel of a finished job is compute-queues' no-op
    status, got = await gw.json("POST", f"/q/{Q}/j/{jid}/cancel", params={"namespace": "x"})
    assert (status, got) == (200, {"message": "Job already Finished|Removed"})


@pytest.mark.docker
async def test_namespace_replacements(stack: Stack, busybox_image: str) -> None:
    """Two jobs in one namespace: the older ends JobReplacedByClient (its container stopped)
    and drops out of the queue's listing; only the newest runs."""
    gw = await stack.gateway()
    await stack.worker(Q)
    peer = await stack.peer()
    namespace = new_namespaces(1)[0]
    older = await submit_in(gw, Q, sleeper(), namespace)
    await until(peer, Q, older, running)
    containers = await asyncio.to_thread(running_containers, older)
    since = time.time() - 1

    newer = await submit_in(gw, Q, sleeper(), namespace)
    done = await gw.wait_job(Q, older)
    assert (done["cqState"], done["cqFinishedReason"]) == ("Finished", "JobReplacedByClient")
    assert done["reason"] == "cancelled" and done["result"]["replacedBy"] == newer
    status, result = await gw.json("GET", f"/q/{Q}/j/{older}/result.json")
    assert status == 200 and result["data"]["finishedReason"] == "JobReplacedByClient"
    await asyncio.to_thread(wait_removed, containers, since)

    listed = await queue_jobs(gw, Q)
    assert older not in listed
    assert listed[newer]["state"] in ("Queued", "Running")
    assert listed[newer]["namespaces"] == [namespace]
    await cancel(gw, Q, newer, "*")


async def test_a_replaced_job_runs_on_for_its_grace(stack: Stack) -> None:
    """compute-queues waits before it ends a replaced job that is older than 20 s (4 s, and
    8 s past a minute): here every job is old enough for a 1.5 s grace, and the release
    lands that long after the newer submission, in the server's time."""
    gw = await stack.gateway(replace_grace=ReplaceGrace(((0, 1_500),)))
    peer = await stack.peer()
    older = await submit_in(gw, "grace", sleeper(), "n")
    newer = await submit_in(gw, "grace", sleeper(), "n")
    assert await namespaces_of(gw, "grace", older) == ["n"]  # still held, for now
    ended = await until(peer, "grace", older, lambda s: s.finished)
    assert ended.cq_state == ("Finished", "JobReplacedByClient")
    held = await peer.read_subject(subjects.JOBS_STREAM, subjects.job_subject("grace", newer))
    gone = await peer.read_subject(subjects.JOBS_STREAM, subjects.job_subject("grace", older))
    assert held[0].ts is not None and gone[-1].ts is not None
    assert gone[-1].ts - held[0].ts >= 1_500


async def test_a_gateway_that_stops_does_the_replacements_still_in_their_grace(
    stack: Stack,
) -> None:
    """Nothing but the gateway keeps a grace's timer: when it stops, the jobs it was about
    to replace are released at once rather than left running in the namespace."""
    gw = await stack.gateway(replace_grace=ReplaceGrace(((0, 600_000),)))  # ten minutes
    peer = await stack.peer()
    older = await submit_in(gw, "stopping", sleeper(), "n")
    await submit_in(gw, "stopping", sleeper(), "n")
    assert await namespaces_of(gw, "stopping", older) == ["n"]
    gw.stop.set()
    assert gw.task is not None
    await asyncio.wait_for(asyncio.shield(gw.task), 30)
    ended = await until(peer, "stopping", older, lambda s: s.finished, timeout=10)
    assert ended.cq_state == ("Finished", "JobReplacedByClient")


async def test_a_cancel_names_only_a_namespace_that_holds_the_job(gateway: Gateway) -> None:
    jid = await submit_in(gateway, "q", sleeper(), "a")
    status, got = await gateway.json("POST", f"/q/q/j/{jid}/cancel")  # '_' does not hold it
    assert status == 400, got
    assert "namespace '_' does not hold job" in got["error"] and "'a'" in got["error"]
    status, got = await gateway.json("POST", f"/q/q/j/{jid}/b/cancel", params={"namespace": "a"})
    assert status == 400 and "names namespace 'b' in the path and 'a'" in got["error"], got
    assert await namespaces_of(gateway, "q", jid) == ["a"]
    for bad in ("", "x" * 300):
        status, got = await gateway.json(
            "POST", "/q/q", json={"definition": sleeper(), "control": {"namespace": bad}}
        )
        assert status == 400 and "namespace" in got["error"], got
    status, got = await gateway.json("POST", "/q/q", json={"definition": sleeper(), "control": "x"})
    assert status == 400 and "control must be an object" in got["error"], got
    assert (await cancel(gateway, "q", UNKNOWN, None)) == {"message": "Job not found"}
    assert await namespaces_of(gateway, "q", UNKNOWN) == []


@pytest.mark.docker
async def test_copy_puts_the_same_job_on_another_queue(stack: Stack, busybox_image: str) -> None:
    gw = await stack.gateway(exposed_queues=("src",))
    await stack.worker("dst")
    definition = {"image": IMAGE, "command": f"echo copied {random.randrange(10**6)}"}
    status, got = await gw.json("POST", "/q/src", json={"definition": definition})
    jid = got["jobId"]

    body = {"queue": "dst", "control": {"namespace": "copies"}}
    status, got = await gw.json("POST", f"/j/{jid}/copy", json=body)
    assert (status, got) == (200, {"success": True, "jobId": jid}), got
    done = await gw.wait_job("dst", jid)
    assert done["reason"] == "success" and done["definition"] == definition
    assert await namespaces_of(gw, "dst", jid) == ["copies"]
    status, logs = await gw.json("GET", f"/q/dst/j/{jid}/run-logs.json")
    assert "".join(logs["data"]).startswith("copied ")
    # the source is untouched: still queued, no worker there
    assert (await queue_jobs(gw, "src"))[jid]["state"] == "Queued"
    # the queue form, and the queue named by ?queue=
    for path in (f"/q/src/j/{jid}/copy", f"/j/{jid}/copy?queue=src"):
        status, got = await gw.json("POST", path, json={"queue": "other"})
        assert (status, got) == (200, {"success": True, "jobId": jid}), (path, got)
    assert (await queue_jobs(gw, "other"))[jid]["namespaces"] == ["_"]

    status, got = await gw.json("POST", f"/j/{UNKNOWN}/copy", json={"queue": "dst"})
    assert status == 404 and got["code"] == "job_not_found", got
    for bad, says in (
        ({}, "needs the queue to copy the job to"),
        ({"queue": "a.b"}, "is not valid"),
        ({"queue": "dst", "control": {"namespace": "*"}}, "'*'"),
        ([], "must be a JSON object"),
    ):
        status, got = await gw.json("POST", f"/j/{jid}/copy", json=bad)
        assert status == 400 and says in got["error"], (bad, got)


@pytest.mark.docker
async def test_compute_queues_listings_drop_finished_jobs_after_a_minute(
    stack: Stack, busybox_image: str
) -> None:
    """A finished job stays in compute-queues' listing for 60 s after it finishes, then
    drops out; cancelled ones never show. Asman's own listing keeps everything."""
    gw = await stack.gateway()
    assert gw.config.cq_finished_listed_s == 60  # compute-queues' MAX_TIME_FINISHED_JOB_IN_QUEUE
    brief = await stack.gateway(cq_finished_listed_s=0)
    await stack.worker("l")
    status, got = await gw.json("POST", "/q/l", json={"image": IMAGE, "command": "echo done"})
    assert status == 200, got
    done_id = got["jobId"]
    await gw.wait_job("l", done_id)
    cancelled = await submit_in(gw, "l", sleeper(), "c")
    await cancel(gw, "l", cancelled, "c")
    await gw.wait_job("l", cancelled)

    listed = await queue_jobs(gw, "l")
    assert listed[done_id]["finishedReason"] == "Success" and cancelled not in listed
    _, status_view = await gw.json("GET", "/q/l/status")
    assert set(status_view["jobs"]) == {done_id}
    assert await queue_jobs(brief, "l") == {}
    _, status_view = await brief.json("GET", "/q/l/status")
    assert status_view["jobs"] == {}
    _, native = await brief.json("GET", "/api/v1/queues/l/jobs")
    assert {j["jobId"]: j["reason"] for j in native["jobs"]} == {
        done_id: "success",
        cancelled: "cancelled",
    }


async def test_namespaces_through_asmans_own_api(gateway: Gateway) -> None:
    path = "/api/v1/queues/own/jobs"
    definition = sleeper()
    for n in ("b", "a"):
        status, view = await gateway.json(
            "POST", path, json={"definition": definition, "namespace": n}
        )
        assert status in (200, 201), view
    jid = view["jobId"]
    assert view["namespaces"] == ["a", "b"]
    status, view = await gateway.json("POST", f"{path}/{jid}/cancel", json={"namespace": "a"})
    assert status == 200 and view["state"] == "queued" and view["namespaces"] == ["b"], view
    status, got = await gateway.json("POST", f"{path}/{jid}/cancel", json={"namespace": "zz"})
    assert status == 400 and "does not hold job" in got["error"], got
    status, view = await gateway.json("POST", f"{path}/{jid}/cancel", json={"namespace": "b"})
    assert view["reason"] == "cancelled" and view["namespaces"] == []
    # a newer job in one namespace replaces the older, here too
    status, first = await gateway.json(
        "POST", path, json={"definition": sleeper(), "namespace": "n"}
    )
    status, second = await gateway.json(
        "POST", path, json={"definition": sleeper(), "namespace": "n"}
    )
    done = await gateway.wait_job("own", first["jobId"])
    assert done["cqFinishedReason"] == "JobReplacedByClient"
    assert done["result"]["replacedBy"] == second["jobId"]
