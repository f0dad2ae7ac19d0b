"""Multi-step jobs end to end: real nats-server, real Docker engine, real blob store.

The steps of a job run in order on one worker, in hardened containers, sharing the job's
inputs, its volumes and its outputs; a failing step ends the job with its exit code unless it
may fail (``ignoreError``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from workerstack import IMAGE, Stack, containers_of, job_text, output_bytes, run_job

pytestmark = [pytest.mark.docker]


async def test_steps_share_a_volume_inputs_and_outputs_in_order(stack: Stack) -> None:
    client = await stack.log()
    blobs = await stack.blobs(client)
    await stack.start_worker("steps")
    state = await run_job(
        client,
        "steps",
        {
            "image": IMAGE,
            "volumes": ["/data"],
            "inputs": {"in.txt": "IN\n"},
            "outputPaths": [{"path": "/data/who.txt"}],
            "steps": [
                {"command": ["sh", "-c", "echo one > /data/a.txt"]},
                {
                    "name": "join",
                    "command": ["sh", "-c", "cat /data/a.txt /inputs/in.txt > /outputs/b.txt"],
                },
                {
                    "command": ["sh", "-c", "id -u; grep -E '^(CapEff|NoNew)' /proc/self/status"],
                    "stdout": "/data/who.txt",
                },
            ],
        },
    )
    assert state.reason == "success", state.result
    assert state.result is not None
    outs = await output_bytes(blobs, state)
    assert outs["b.txt"] == b"one\nIN\n"
    # every step's container is hardened as a single-step job's is
    who = outs["data/who.txt"].decode()
    assert who.startswith("65534\n") and "CapEff:\t0000000000000000" in who, who
    assert "NoNewPrivs:\t1" in who
    assert [s.exit_code for s in state.result.steps] == [0, 0, 0]
    assert [s.name for s in state.result.steps] == ["step 1", "join", "step 3"]
    assert "65534" in state.result.steps[2].stdout  # the tail, though redirected
    assert all(s.started_ms and s.ended_ms for s in state.result.steps)
    assert containers_of(state.job_id) == []


async def test_a_failing_step_ends_the_job_with_its_exit_code_and_says_which(
    stack: Stack,
) -> None:
    client = await stack.log()
    blobs = await stack.blobs(client)
    await stack.start_worker("stepfail")
    state = await run_job(
        client,
        "stepfail",
        {
            "image": IMAGE,
            "steps": [
                {"command": "sh -c 'echo first > /outputs/1'"},
                {"name": "breaks", "command": "sh -c 'echo oops >&2; exit 3'"},
                {"command": "sh -c 'echo never > /outputs/3'"},
            ],
        },
    )
    assert state.reason == "failed" and state.result is not None
    assert state.result.exit_code == 3
    assert set(await output_bytes(blobs, state)) == {"1"}  # the third step never ran
    assert [s.exit_code for s in state.result.steps] == [0, 3]
    assert state.result.steps[1].stderr == "oops\n"
    text = await job_text(client, state)
    assert "step 2 of 3 (breaks) exited with 3" in text.get("system", ""), text


async def test_ignore_error_goes_on_and_stdin_is_fed_from_a_file(stack: Stack) -> None:
    client = await stack.log()
    blobs = await stack.blobs(client)
    await stack.start_worker("stepignore")
    state = await run_job(
        client,
        "stepignore",
        {
            "inputs": {"words.txt": "b\na\nc\n"},
            "steps": [
                {"image": IMAGE, "command": "sh -c 'exit 5'", "ignoreError": True},
                {
                    "image": IMAGE,
                    "command": "sort",
                    "stdin": "/inputs/words.txt",
                    "stdout": "/outputs/sorted.txt",
                    "stderr": "/outputs/err.txt",
                },
            ],
        },
    )
    assert state.reason == "success", state.result
    assert state.result is not None and state.result.exit_code == 0
    assert [s.exit_code for s in state.result.steps] == [5, 0]
    outs = await output_bytes(blobs, state)
    assert outs["sorted.txt"] == b"a\nb\nc\n" and outs["err.txt"] == b""


async def test_the_worker_never_follows_a_step_s_symlinks_nor_trusts_its_names(
    stack: Stack,
) -> None:
    """A step plants symlinks to the host's files and a name with a newline in the shared
    folders: the worker (root) neither writes a redirect through them nor collects them."""
    client = await stack.log()
    blobs = await stack.blobs(client)
    await stack.start_worker("stephostile")
    plant = (
        "ln -s /etc /data/etc; ln -s /etc/passwd /data/out/passwd; "
        "echo x > \"/data/out/bad$(printf '\\001')name\"; echo fine > /data/out/ok.txt"
    )
    state = await run_job(
        client,
        "stephostile",
        {
            "image": IMAGE,
            "volumes": ["/data"],
            "outputPaths": [{"path": "/data/out", "type": "directory"}],
            "steps": [{"command": ["sh", "-c", f"mkdir -p /data/out; {plant}"]}],
        },
    )
    assert state.reason == "success", state.result
    outs = await output_bytes(blobs, state)
    assert outs == {"data/out/ok.txt": b"fine\n"}
    text = (await job_text(client, state)).get("system", "")
    assert "data/out/bad\\x01name skipped" in text, text

    state = await run_job(
        client,
        "stephostile",
        {
            "image": IMAGE,
            "volumes": ["/data"],
            "steps": [
                {"command": ["sh", "-c", "ln -s /etc /data/etc"]},
                {"command": ["echo", "pwned"], "stdout": "/data/etc/asman-pwned"},
            ],
        },
    )
    assert state.reason == "error" and state.result is not None
    assert "symlink" in state.result.message, state.result.message
    assert not Path("/etc/asman-pwned").exists()  # noqa: ASYNC240


async def test_a_volume_under_tmp_is_shared_over_the_scratch_tmpfs(stack: Stack) -> None:
    client = await stack.log()
    blobs = await stack.blobs(client)
    await stack.start_worker("steptmp")
    state = await run_job(
        client,
        "steptmp",
        {
            "image": IMAGE,
            "volumes": ["/tmp/work"],
            "steps": [
                {"command": ["sh", "-c", "echo kept > /tmp/work/a; echo gone > /tmp/b"]},
                {"command": ["sh", "-c", "cat /tmp/work/a; ls /tmp"], "stdout": "/outputs/o"},
            ],
        },
    )
    assert state.reason == "success", state.result
    assert (await output_bytes(blobs, state))["o"] == b"kept\nwork\n"  # /tmp/b was the step's
