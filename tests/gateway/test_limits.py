"""The edge's pure parts: token buckets, stream counts, why a job waits."""

from __future__ import annotations

import pytest

from asman.gateway.limits import RateLimited, RateLimiter
from asman.gateway.views import waiting
from asman.log.events import JobState
from asman.log.workers import WorkerInfo


def test_token_bucket_refills_at_its_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=3, max_streams=1)
    for _ in range(3):
        limiter.take("a", now=100.0)
    with pytest.raises(RateLimited) as info:
        limiter.take("a", now=100.0)
    assert info.value.retry_after_s == pytest.approx(0.5)
    limiter.take("b", now=100.0)  # another client has its own bucket
    limiter.take("a", now=100.5)  # one token back after 1/rate seconds
    with pytest.raises(RateLimited):
        limiter.take("a", now=100.5)
    for _ in range(3):
        limiter.take("a", now=200.0)  # refilled, but never above the burst
    with pytest.raises(RateLimited):
        limiter.take("a", now=200.0)


def test_stream_counts_and_the_bounded_client_table() -> None:
    limiter = RateLimiter(rate=1.0, burst=1, max_streams=2, max_clients=3)
    limiter.open_stream("s")
    limiter.open_stream("s")
    with pytest.raises(RateLimited, match="event streams open"):
        limiter.open_stream("s")
    for n in range(10):
        limiter.take(f"c{n}", now=1.0)
    assert len(limiter) <= 4  # bounded, and the client with open streams is kept
    with pytest.raises(RateLimited):
        limiter.open_stream("s")
    limiter.close_stream("s")
    limiter.open_stream("s")


def job(requirements: dict[str, object] | None = None, state: str = "queued") -> JobState:
    definition: dict[str, object] = {"image": "x"}
    if requirements:
        definition["requirements"] = requirements
    return JobState(
        queue="q",
        job_id="a" * 64,
        state=state,  # type: ignore[arg-type]
        definition=definition,
        definition_json="{}",
        submitter="s",
        submitted_ms=0,
        via="",
        last_seq=1,
    )


def worker(n: int, **kw: object) -> WorkerInfo:
    fields: dict[str, object] = {"slots": 1, "free_slots": 1}
    fields.update(kw)
    return WorkerInfo(worker_id=f"{n:064x}", queue="q", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("requirements", "workers", "code"),
    [
        (None, [], "no_workers"),
        (None, [worker(1, draining=True)], "workers_draining"),
        ({"gpus": 2}, [worker(1, gpus=1, free_gpus=1)], "no_worker_with_gpus"),
        ({"gpus": 1}, [worker(1, gpus=1, free_gpus=0)], "workers_busy"),
        ({"memory": "1g"}, [worker(1, memory_bytes=512 * 1024**2)], "no_worker_with_memory"),
        ({"memory": "1g"}, [worker(1, memory_bytes=0)], "dispatching"),  # no ceiling
        (None, [worker(1, free_slots=0), worker(2, free_slots=0)], "workers_busy"),
        (None, [worker(1, free_slots=0), worker(2)], "dispatching"),
    ],
)
def test_why_a_job_waits(
    requirements: dict[str, object] | None, workers: list[WorkerInfo], code: str
) -> None:
    why = waiting(job(requirements), workers)
    assert why is not None and why["code"] == code and why["message"]


def test_only_queued_jobs_wait() -> None:
    assert waiting(job(state="running"), []) is None


def test_public_names_are_exported() -> None:
    import asman.gateway as gateway

    public = {n for n in vars(gateway) if not n.startswith("_")} - {
        "annotations",  # from __future__
        "app",  # submodules imported by the package itself
        "config",
        "api",
        "compat",
        "files",
        "follow",
        "limits",
        "metrics",
        "middleware",
        "openapi",
        "page",
        "schemas",
        "signing",
        "sse",
        "state",
        "tes",
        "views",
    }
    assert set(gateway.__all__) == public
