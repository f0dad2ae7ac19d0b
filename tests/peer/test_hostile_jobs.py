"""Property: whatever a job holds, it ends, once, and the worker runs a normal job after it.

Hypothesis draws hostile definitions (huge numbers, odd fields, reserved paths, strange
environments) and hostile output trees (names in any bytes, deep folders, fifos, sockets-like
special files, symlinks out of the folder, sparse giants, more files than allowed) and a real
worker runs them on a real Docker engine against a real nats-server. Definitions go to the log
raw, as a stranger with a key of their own can write them, so the worker's own checks are what
is tested, not the gateway's. One worker serves every example: a job that took it down or
wedged it fails the examples after it, and the normal job at the end (issue 13)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, reject, settings
from hypothesis import strategies as st
from test_poison import submit_raw
from workerstack import IMAGE, Stack, run_job

from asman.errors import AsmanError, Conflict, InvalidDefinition
from asman.log import jobs
from asman.log.connection import Log
from asman.log.definition import JobSpec, job_id
from asman.peer.worker import Worker

pytestmark = [pytest.mark.docker, pytest.mark.slow]

QUEUE = "hostile"
NORMAL = itertools.count()  # each example's normal job is a new one, never a cached result
ENDINGS = {"success", "failed", "error", "timed_out"}

# --- output trees -------------------------------------------------------------------------

# one path component: any bytes but NUL and '/', never '.' or '..'
components = st.binary(min_size=1, max_size=40).map(
    lambda b: b"x" + b if b in (b".", b"..") else b.replace(b"\0", b"_").replace(b"/", b"_")
)


def octal(b: bytes) -> str:
    """Bytes as a printf format of octal escapes: no quoting problem survives it."""
    return "".join(f"\\{c:03o}" for c in b)


def path_of(parts: list[bytes]) -> str:
    """Shell words naming /outputs/<parts…>: printf builds each component from octal escapes
    (a trailing newline is lost to $(…), which only changes the name)."""
    return "/outputs/" + "/".join(f"$(printf '{octal(p)}')" for p in parts)


@st.composite
def output_trees(draw: st.DrawFn) -> str:
    """A shell script that writes a hostile tree into /outputs."""
    lines: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        parts = draw(st.lists(components, min_size=1, max_size=4))
        kind = draw(st.sampled_from(["file", "fifo", "symlink", "hardlink", "sparse", "empty"]))
        path = path_of(parts)
        parent = path_of(parts[:-1]) if len(parts) > 1 else "/outputs"
        lines.append(f'mkdir -p "{parent}"')
        if kind == "file":
            lines.append(f'echo data > "{path}"')
        elif kind == "fifo":
            lines.append(f'mkfifo "{path}"')
        elif kind == "symlink":
            target = draw(st.sampled_from(["/", "/etc/passwd", "../../..", "/proc/self/environ"]))
            lines.append(f'ln -s {target} "{path}"')
        elif kind == "hardlink":
            lines.append(f'ln /etc/passwd "{path}" || echo x > "{path}"')
        elif kind == "sparse":
            lines.append(f'truncate -s {draw(st.sampled_from(["2M", "40G"]))} "{path}"')
        else:
            lines.append(f': > "{path}"')
    if draw(st.booleans()):  # deep
        depth = draw(st.integers(50, 400))
        lines.append(f"d=/outputs; for i in $(seq {depth}); do d=$d/d; done; mkdir -p $d")
        lines.append("echo deep > $d/f")
    if draw(st.booleans()):  # many
        lines.append(f"for i in $(seq {draw(st.integers(1, 60))}); do : > /outputs/m$i; done")
    lines.append("true")
    return "; ".join(lines)


# --- definitions --------------------------------------------------------------------------

huge = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(["9" * 4000, "-1", "0", "1e308", "NaN", "", "12 TiB", "1PiB", "3x"]),
)
field_overrides = st.fixed_dictionaries(
    {},
    optional={
        "maxDuration": st.one_of(st.sampled_from(["30s", "0s", "-5s", "9" * 50 + "d"]), huge),
        "shmSize": huge,
        "requirements": st.fixed_dictionaries(
            {},
            optional={
                "memory": huge,
                "cpus": st.one_of(huge, st.floats(allow_nan=False, allow_infinity=False)),
                "gpus": huge,
            },
        ),
        "env": st.dictionaries(st.text(min_size=0, max_size=20), st.text(max_size=50), max_size=3),
        "configFiles": st.dictionaries(
            st.sampled_from(
                ["/etc/hosts", "/sbin/docker-init", "/tmp/x", "/inputs/../../etc/x", "rel", "/ok"]
            ),
            st.sampled_from(["data:,x", "data:;base64,!!!", "not a url"]),
            max_size=2,
        ),
        "workdir": st.sampled_from(["/", "/nonexistent", "relative", "/proc"]),
        "whatIsThis": st.text(max_size=10),
    },
)


@st.composite
def hostile_jobs(draw: st.DrawFn) -> dict[str, Any]:
    definition: dict[str, Any] = {
        "image": IMAGE,
        "command": ["sh", "-c", draw(output_trees())],
        "maxDuration": "30s",
    }
    definition.update(draw(st.one_of(st.just({}), field_overrides)))  # half run the tree
    return definition


def memory_asked(definition: dict[str, Any]) -> int:
    """The memory a definition validly asks for (0: none, or not a valid definition)."""
    try:
        return JobSpec.from_definition(definition).memory or 0
    except AsmanError:
        return 0


async def runs_to_an_end(client: Log, definition: dict[str, Any], ceiling: int) -> None:
    try:
        job_id(definition)
    except InvalidDefinition:
        reject()  # no canonical JSON (an integer past 2^53, NaN): no job id, no place on the log
    try:
        jid = await submit_raw(client, QUEUE, definition)
    except Conflict:  # hypothesis drew this one before: it is the same job, already ended
        jid = job_id(definition)
    if memory_asked(definition) > ceiling:
        # more memory than this worker allows: never claimed here (it waits for a worker
        # that allows it); a normal job submitted after it runs, then its submitter cancels
        after = await run_job(client, QUEUE, {"image": IMAGE, "command": f"echo {next(NORMAL)}"})
        assert after.reason == "success", after.result
        waiting = await jobs.read_job(client, QUEUE, jid)
        assert waiting is not None
        assert waiting.finished or waiting.claims == 0, (waiting.claims, definition)
        if not waiting.finished:
            await jobs.cancel(client, QUEUE, jid)
        state = await jobs.wait_finished(client, QUEUE, jid, 30)
        event("too big for this worker")
        assert state.claims == 0 and state.reason == "cancelled", state.reason
        return
    state = await jobs.wait_finished(client, QUEUE, jid, 90)
    event(state.reason)  # --hypothesis-show-statistics tells how the examples ended
    assert state.reason in ENDINGS, (state.reason, state.result, definition)
    assert state.claims == 1, (state.claims, definition)  # the worker never died on it
    assert state.result is not None
    assert len(state.result.message.splitlines()) <= 1, state.result.message


@pytest.fixture
async def served(stack: Stack) -> tuple[Log, asyncio.Task[None], Worker]:
    client = await stack.log()
    worker = await stack.start_worker(
        QUEUE, slots=2, max_outputs=40, max_output_bytes=4 * 1024 * 1024, pids_limit=64
    )
    return client, stack.tasks[-1][1], worker


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(  # the tree that once took a worker down, always tried
    definition={
        "image": IMAGE,
        "command": ["sh", "-c", "mkfifo /outputs/f; echo x > \"/outputs/$(printf 'n\\377')\""],
    }
)
@example(definition={"image": IMAGE, "command": "true", "requirements": {"memory": "12 TiB"}})
@given(definition=hostile_jobs())
async def test_every_hostile_job_ends_once_and_the_worker_serves_on(
    served: tuple[Log, asyncio.Task[None], Worker], definition: dict[str, Any]
) -> None:
    """The same worker for every example (the fixture is shared on purpose)."""
    client, task, worker = served
    await runs_to_an_end(client, definition, worker.caps.memory_bytes)
    assert not task.done(), task
    normal = next(NORMAL)
    state = await run_job(client, QUEUE, {"image": IMAGE, "command": f"echo normal {normal}"})
    assert state.reason == "success", state.result
    assert not task.done(), task
