"""The Docker runtime against a real engine: hardening seen from inside, streams, kill paths,
builds, orphans; archive unpacking and job folders without an engine."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import stat
import tarfile
import time
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from asman.errors import (
    DockerUnavailable,
    ImageError,
    InvalidDefinition,
    InvalidInput,
    InvalidPath,
    RuntimeFailure,
)
from asman.peer.archive import unpack_archive
from asman.peer.docker import (
    BuildSpec,
    ContainerSpec,
    DockerRuntime,
    RunOutcome,
    _container_args,
    build_tag,
)
from asman.peer.jobdir import JobDir, prepare_job_dir, remove_job_dir

MiB = 1024 * 1024


class Output:
    """Collects on_output chunks."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []

    async def __call__(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data))

    def text(self, stream: str) -> str:
        return b"".join(d for s, d in self.chunks if s == stream).decode()


def spec_for(job_dir: JobDir, image: str, command: list[str], **kw: Any) -> ContainerSpec:
    return ContainerSpec(
        job_id=kw.pop("job_id", f"test-{uuid.uuid4().hex[:12]}"),
        queue="test-queue",
        worker_id=kw.pop("worker_id", "test-worker"),
        attempt=1,
        image=image,
        command=command,
        inputs_dir=job_dir.inputs,
        outputs_dir=job_dir.outputs,
        **kw,
    )


async def run(runtime: DockerRuntime, spec: ContainerSpec, **kw: Any) -> tuple[RunOutcome, Output]:
    out = Output()
    kw.setdefault("stop", asyncio.Event())
    kw.setdefault("timeout_s", 60)
    outcome = await runtime.run(spec, on_output=out, **kw)
    return outcome, out


def leftovers(client: docker.DockerClient, job_id: str) -> list[Any]:
    return client.containers.list(all=True, filters={"label": f"asman.job={job_id}"})


# ---- hardening -----------------------------------------------------------------------------

HARDENING_PROBE = (
    "id -u; grep CapEff /proc/self/status; grep NoNewPrivs /proc/self/status; touch /x 2>&1; "
    "ls /sys/class/net; cat /sys/fs/cgroup/pids/pids.max; "
    "cat /sys/fs/cgroup/memory/memory.limit_in_bytes; ulimit -c; ulimit -n; "
    "grep ' /tmp ' /proc/mounts; echo env:$JOB_ID:$JOB_INPUTS:$JOB_OUTPUTS:$A"
)


@pytest.mark.docker
async def test_hardening_seen_from_inside(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str
) -> None:
    spec = spec_for(
        job_dir,
        busybox_image,
        ["sh", "-c", HARDENING_PROBE],
        pids_limit=77,
        memory_bytes=96 * MiB,
        cpus=0.5,
        nofile=1000,
        env={"A": "b", "JOB_ID": "spoofed"},
    )
    outcome, out = await run(docker_runtime, spec)
    lines = out.text("stdout").splitlines()
    assert outcome.exit_code == 0, out.chunks
    assert lines[0] == "65534"
    assert lines[1].split() == ["CapEff:", "0000000000000000"]
    assert lines[2].split() == ["NoNewPrivs:", "1"]
    assert "Read-only file system" in lines[3]
    assert lines[4] == "lo"  # the only interface: network none
    assert lines[5] == "77"
    assert lines[6] == str(96 * MiB)
    assert lines[7:9] == ["0", "1000"]  # core, nofile
    assert "nosuid" in lines[9] and "nodev" in lines[9] and "size=262144k" in lines[9]
    assert lines[10] == f"env:{spec.job_id}:/inputs:/outputs:b"
    assert not outcome.oom_killed and not outcome.timed_out and not outcome.stopped
    assert outcome.ended_ms >= outcome.started_ms > 0


@pytest.mark.docker
async def test_bridge_network_opt_in(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str
) -> None:
    spec = spec_for(job_dir, busybox_image, ["ls", "/sys/class/net"], network="bridge")
    outcome, out = await run(docker_runtime, spec)
    assert outcome.exit_code == 0
    assert set(out.text("stdout").split()) == {"eth0", "lo"}


def test_host_network_and_bad_env_refused(job_dir: JobDir) -> None:
    with pytest.raises(InvalidDefinition, match="network"):
        _container_args(spec_for(job_dir, "x", ["true"], network="host"))
    with pytest.raises(InvalidDefinition, match="env"):
        _container_args(spec_for(job_dir, "x", ["true"], env={"A=B": "c"}))


def test_container_args_gpu_labels_and_limits(job_dir: JobDir) -> None:
    spec = spec_for(
        job_dir,
        "img",
        ["true"],
        gpu_devices=("3", "GPU-abc"),
        memory_bytes=64 * MiB,
        cpus=1.5,
        shm_size_bytes=MiB,
    )
    create, host = _container_args(spec)
    assert "CUDA_VISIBLE_DEVICES=0,1" in create["environment"]
    (request,) = host["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["3", "GPU-abc"]
    assert request["Capabilities"] == [["gpu"]]
    assert host["mem_limit"] == host["memswap_limit"] == 64 * MiB
    assert host["nano_cpus"] == 1_500_000_000
    assert host["cap_drop"] == ["ALL"] and host["privileged"] is False
    assert host["network_mode"] == "none" and host["init"] is True
    assert create["labels"] == {
        "asman": "1",
        "asman.job": spec.job_id,
        "asman.queue": "test-queue",
        "asman.worker": "test-worker",
        "asman.attempt": "1",
    }
    _, plain = _container_args(spec_for(job_dir, "img", ["true"]))
    assert "device_requests" not in plain


def test_docker_socket_never_mounted(job_dir: JobDir, tmp_path: Path) -> None:
    sock = Path("/var/run/docker.sock")
    spec = spec_for(job_dir, "img", ["true"], extra_mounts=((sock, "/etc/x"),))
    with pytest.raises(InvalidPath):
        _container_args(spec)
    conf = tmp_path / "c.conf"
    conf.write_text("x")
    with pytest.raises(InvalidPath):
        _container_args(spec_for(job_dir, "img", ["true"], extra_mounts=((conf, "/outputs/x"),)))
    with pytest.raises(InvalidPath):
        _container_args(spec_for(job_dir, "img", ["true"], extra_mounts=((conf, "rel/x"),)))
    with pytest.raises(InvalidPath):  # a file over the whole /tmp; one under it is fine
        _container_args(spec_for(job_dir, "img", ["true"], extra_mounts=((conf, "/tmp"),)))
    _container_args(spec_for(job_dir, "img", ["true"], extra_mounts=((conf, "/tmp/run.sh"),)))


# ---- folders and output --------------------------------------------------------------------


@pytest.mark.docker
async def test_inputs_read_only_outputs_writable(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, tmp_path: Path
) -> None:
    (job_dir.inputs / "in.txt").write_text("hello input")
    conf = tmp_path / "job.conf"
    conf.write_text("conf-content")
    script = (
        "cat /inputs/in.txt; echo; cat /etc/job.conf; echo; "
        "echo x > /inputs/new 2>&1 || echo inputs-ro; "
        "echo x > /etc/job.conf 2>&1 || echo conf-ro; "
        "mkdir -p /outputs/a/b && echo deep > /outputs/a/b/f.txt && echo outputs-ok; "
        "mkdir /outputs/locked && touch /outputs/locked/f && chmod 0500 /outputs/locked"
    )
    spec = spec_for(
        job_dir, busybox_image, ["sh", "-c", script], extra_mounts=((conf, "/etc/job.conf"),)
    )
    outcome, out = await run(docker_runtime, spec)
    assert outcome.exit_code == 0, out.chunks
    assert out.text("stdout").split("\n")[:5] == [
        "hello input",
        "conf-content",
        "inputs-ro",
        "conf-ro",
        "outputs-ok",
    ]
    assert "Read-only file system" in out.text("stderr")
    made = job_dir.outputs / "a" / "b" / "f.txt"
    assert made.read_text() == "deep\n"
    assert made.stat().st_uid == 65534
    assert not (job_dir.inputs / "new").exists()
    remove_job_dir(job_dir)  # files owned by 65534 in a read-only folder go too
    assert not job_dir.root.exists()


def test_prepare_job_dir_is_fresh_per_attempt(tmp_path: Path) -> None:
    first = prepare_job_dir(tmp_path, "job", 1)
    (first.outputs / "stale").write_text("x")
    again = prepare_job_dir(tmp_path, "job", 1)
    assert list(again.outputs.iterdir()) == []
    assert stat.S_IMODE(again.outputs.stat().st_mode) == 0o777
    assert prepare_job_dir(tmp_path, "job", 2).root != again.root
    with pytest.raises(InvalidPath):
        prepare_job_dir(tmp_path, "../escape", 1)
    remove_job_dir(again)
    assert (tmp_path / "job").exists()  # attempt 2 is still there
    remove_job_dir(prepare_job_dir(tmp_path, "job", 2))
    assert not (tmp_path / "job").exists()


@pytest.mark.docker
async def test_exit_code_and_separate_streams(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str
) -> None:
    spec = spec_for(
        job_dir, busybox_image, ["sh", "-c", "echo to-out; echo to-err >&2; echo more; exit 7"]
    )
    outcome, out = await run(docker_runtime, spec)
    assert outcome.exit_code == 7
    assert out.text("stdout") == "to-out\nmore\n"
    assert out.text("stderr") == "to-err\n"


@pytest.mark.docker
async def test_large_output_is_complete(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str
) -> None:
    spec = spec_for(job_dir, busybox_image, ["sh", "-c", "seq 1 200000"])
    outcome, out = await run(docker_runtime, spec)
    assert outcome.exit_code == 0 and outcome.output_dropped_bytes == 0
    assert out.text("stdout") == "".join(f"{i}\n" for i in range(1, 200001))


@pytest.mark.docker
async def test_slow_reader_never_stalls_the_container(busybox_image: str, job_dir: JobDir) -> None:
    """Past the buffer, output is dropped and counted; the container runs on and ends."""

    async def slow(stream: str, data: bytes) -> None:
        seen.append(data)
        await asyncio.sleep(0.05)

    seen: list[bytes] = []
    spec = spec_for(job_dir, busybox_image, ["sh", "-c", "head -c 4000000 /dev/zero | tr '\\0' a"])
    t0 = time.monotonic()
    async with DockerRuntime(output_buffer_bytes=64 * 1024) as runtime:
        outcome = await runtime.run(spec, on_output=slow, stop=asyncio.Event(), timeout_s=60)
    assert time.monotonic() - t0 < 15
    assert outcome.exit_code == 0 and outcome.output_dropped_bytes > 0
    delivered = sum(len(d) for d in seen[:-1])
    assert delivered + outcome.output_dropped_bytes == 4_000_000
    assert b"bytes of output dropped" in seen[-1]


@pytest.mark.docker
async def test_start_failure_is_runtime_failure(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    spec = spec_for(job_dir, busybox_image, ["true"], user="no-such-user")
    with pytest.raises(RuntimeFailure, match="start the container"):
        await run(docker_runtime, spec)
    assert leftovers(docker_client, spec.job_id) == []


@pytest.mark.docker
async def test_missing_command_exits_127(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str
) -> None:
    outcome, out = await run(docker_runtime, spec_for(job_dir, busybox_image, ["no-such-cmd"]))
    assert outcome.exit_code == 127
    assert "no-such-cmd" in out.text("stderr")


@pytest.mark.docker
async def test_output_arrives_while_running(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    """Stop on the first chunk: only possible if it arrives before the container ends."""
    stop = asyncio.Event()
    seen: list[bytes] = []

    async def on_output(stream: str, data: bytes) -> None:
        seen.append(data)
        stop.set()

    spec = spec_for(job_dir, busybox_image, ["sh", "-c", "echo a; sleep 20; echo b"])
    outcome = await docker_runtime.run(spec, on_output=on_output, stop=stop, grace_s=5)
    assert outcome.stopped and not outcome.timed_out
    assert b"".join(seen) == b"a\n"
    assert leftovers(docker_client, spec.job_id) == []


# ---- ending ---------------------------------------------------------------------------------


@pytest.mark.docker
@pytest.mark.slow
async def test_timeout_kills_and_removes(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    spec = spec_for(job_dir, busybox_image, ["sh", "-c", "echo started; sleep 30"])
    t0 = time.monotonic()
    outcome, out = await run(docker_runtime, spec, timeout_s=2, grace_s=3)
    assert time.monotonic() - t0 < 15
    assert outcome.timed_out and not outcome.stopped
    assert outcome.exit_code is not None and outcome.exit_code != 0
    assert out.text("stdout") == "started\n"  # output before the kill is kept
    assert leftovers(docker_client, spec.job_id) == []


@pytest.mark.docker
@pytest.mark.slow
async def test_sigterm_ignored_then_sigkill(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    script = "trap '' TERM; while true; do sleep 1; done"
    spec = spec_for(job_dir, busybox_image, ["sh", "-c", script])
    t0 = time.monotonic()
    outcome, _ = await run(docker_runtime, spec, timeout_s=1, grace_s=1)
    assert time.monotonic() - t0 < 15
    assert outcome.timed_out and outcome.exit_code == 137
    assert leftovers(docker_client, spec.job_id) == []


@pytest.mark.docker
@pytest.mark.slow
async def test_stop_event(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(1, stop.set)
    spec = spec_for(job_dir, busybox_image, ["sleep", "30"])
    t0 = time.monotonic()
    outcome, _ = await run(docker_runtime, spec, stop=stop, grace_s=5)
    assert time.monotonic() - t0 < 15
    assert outcome.stopped and not outcome.timed_out
    assert leftovers(docker_client, spec.job_id) == []


@pytest.mark.docker
async def test_stop_already_set_runs_nothing(
    docker_runtime: DockerRuntime, job_dir: JobDir
) -> None:
    stop = asyncio.Event()
    stop.set()
    outcome, out = await run(docker_runtime, spec_for(job_dir, "unused", ["true"]), stop=stop)
    assert outcome.stopped and outcome.exit_code is None and out.chunks == []


@pytest.mark.docker
async def test_cancelled_run_still_removes_container(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    started = asyncio.Event()

    async def on_output(stream: str, data: bytes) -> None:
        started.set()

    spec = spec_for(job_dir, busybox_image, ["sh", "-c", "echo up; sleep 30"])
    task = asyncio.create_task(docker_runtime.run(spec, on_output=on_output, stop=asyncio.Event()))
    await asyncio.wait_for(started.wait(), 20)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert leftovers(docker_client, spec.job_id) == []


@pytest.mark.docker
async def test_failing_on_output_kills_and_reraises(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str, docker_client: Any
) -> None:
    async def on_output(stream: str, data: bytes) -> None:
        raise ValueError("consumer broke")

    spec = spec_for(job_dir, busybox_image, ["sh", "-c", "echo up; sleep 30"])
    with pytest.raises(ValueError, match="consumer broke"):
        await docker_runtime.run(spec, on_output=on_output, stop=asyncio.Event())
    assert leftovers(docker_client, spec.job_id) == []


@pytest.mark.docker
async def test_oom_killed(
    docker_runtime: DockerRuntime, job_dir: JobDir, busybox_image: str
) -> None:
    spec = spec_for(
        job_dir,
        busybox_image,
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=128M", "count=1"],
        memory_bytes=32 * MiB,
    )
    outcome, _ = await run(docker_runtime, spec)
    assert outcome.oom_killed
    assert outcome.exit_code == 137


# ---- images --------------------------------------------------------------------------------


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    async def __call__(self, line: str) -> None:
        self.lines.append(line)


@pytest.mark.docker
async def test_build_inline_then_cached(
    docker_runtime: DockerRuntime, busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    marker = uuid.uuid4().hex
    spec = BuildSpec(dockerfile=f"FROM {busybox_image}\nRUN echo BUILD_MARKER {marker}\n")
    log = Lines()
    try:
        tag = await docker_runtime.build(spec, work_dir=tmp_path / "b1", on_log=log)
        assert tag == build_tag(spec) and tag.startswith("asman-build/")
        assert any(f"BUILD_MARKER {marker}" in line for line in log.lines)
        again = Lines()
        assert await docker_runtime.build(spec, work_dir=tmp_path / "b2", on_log=again) == tag
        assert again.lines == [f"using cached build {tag}"]
    finally:
        docker_client.images.remove(build_tag(spec), force=True)


@pytest.mark.docker
async def test_build_failure_carries_log(
    docker_runtime: DockerRuntime, busybox_image: str, tmp_path: Path
) -> None:
    marker = uuid.uuid4().hex
    spec = BuildSpec(dockerfile=f"FROM {busybox_image}\nRUN echo {marker} && exit 3\n")
    with pytest.raises(ImageError) as caught:
        await docker_runtime.build(spec, work_dir=tmp_path)
    assert "non-zero code: 3" in str(caught.value)
    assert marker in caught.value.log


@pytest.mark.docker
async def test_a_cancelled_build_stops_in_the_engine(
    docker_runtime: DockerRuntime, busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """Cancelling a build cancels it in the engine: its step's container goes away, no image
    is made, and nothing keeps building behind the job's back (docker-py's blocking build
    went on for as long as the Dockerfile said)."""
    marker = uuid.uuid4().hex
    spec = BuildSpec(
        dockerfile=f"FROM {busybox_image}\nRUN echo step {marker} && sleep 60 && echo done\n"
    )
    log = Lines()
    started = asyncio.Event()

    async def on_log(line: str) -> None:
        await log(line)
        if line.strip() == f"step {marker}":  # the step's own output, not the builder's header
            started.set()

    def step_containers() -> list[str]:
        # the engine's list as it is (no inspect per container: other tests' containers
        # come and go meanwhile)
        return [
            c["Id"]
            for c in docker_client.api.containers(all=True)
            if marker in (c.get("Command") or "")
        ]

    task = asyncio.create_task(docker_runtime.build(spec, work_dir=tmp_path, on_log=on_log))
    await asyncio.wait_for(started.wait(), 60)  # the RUN step runs
    since = int(time.time()) - 1
    steps = set(step_containers())
    assert steps, "the step's container runs (what this test watches)"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the engine says the step's container is gone (its destroy event), within 20 s
    gone = await asyncio.to_thread(destroyed, docker_client, steps, since, 20)
    assert gone == steps, "the build's step still runs in the engine"
    assert not step_containers()
    assert not docker_client.images.list(name=build_tag(spec))


def destroyed(client: Any, ids: set[str], since: int, timeout: float) -> set[str]:
    """Which of the containers ``ids`` the engine destroys within ``timeout`` s: its destroy
    events since ``since`` (a replay first, so none is missed, then live ones)."""
    seen: set[str] = set()
    events = client.events(
        since=since,
        until=int(time.time() + timeout),
        decode=True,
        filters={"type": "container", "event": "destroy"},
    )
    try:
        for event in events:
            if event.get("id") in ids:
                seen.add(event["id"])
                if seen == ids:
                    break
    finally:
        events.close()
    return seen


@pytest.mark.docker
async def test_build_args_and_archive_context(
    docker_runtime: DockerRuntime, busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    archive = tmp_path / "ctx.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        add_file(tar, "repo/sub/data.txt", b"from-context\n")
        add_file(tar, "repo/sub/Dockerfile.custom", b"never used: the inline one wins\n")
    fetched: list[str] = []

    async def fetch(url: str, dest: Path) -> Path:
        fetched.append(url)
        return archive

    spec = BuildSpec(
        dockerfile=(
            f"FROM {busybox_image}\nARG X\nCOPY data.txt /data.txt\n"
            'RUN echo "arg=$X" && cat /data.txt\n'
        ),
        context="https://example.invalid/ctx.tar.gz",
        build_context="sub",
        filename="Dockerfile.custom",
        build_args={"X": uuid.uuid4().hex},
    )
    log = Lines()
    try:
        await docker_runtime.build(spec, work_dir=tmp_path / "w", fetch_context=fetch, on_log=log)
        assert fetched == [spec.context]
        assert f"arg={spec.build_args['X']}" in log.lines
        assert "from-context" in log.lines
    finally:
        docker_client.images.remove(build_tag(spec), force=True)


@pytest.mark.docker
async def test_build_context_escape_refused(docker_runtime: DockerRuntime, tmp_path: Path) -> None:
    with pytest.raises(InvalidPath):
        await docker_runtime.build(
            BuildSpec(dockerfile="FROM scratch\n", build_context="../.."), work_dir=tmp_path
        )


def test_build_tag_is_canonical() -> None:
    a = BuildSpec(dockerfile="FROM x", build_args={"A": "1", "B": "2"})
    b = BuildSpec(dockerfile="FROM x", build_args={"B": "2", "A": "1"})
    assert build_tag(a) == build_tag(b) != build_tag(BuildSpec(dockerfile="FROM y"))
    assert len(build_tag(a).split("/")[1].split(":")[0]) == 32


@pytest.mark.docker
async def test_ensure_image(docker_runtime: DockerRuntime, busybox_image: str) -> None:
    log = Lines()
    await docker_runtime.ensure_image(busybox_image, log)
    assert log.lines == []
    with pytest.raises(ImageError, match="not found locally and could not be pulled"):
        await docker_runtime.ensure_image(f"asman-test/absent-{uuid.uuid4().hex[:8]}:x", log)


# ---- engine ---------------------------------------------------------------------------------


@pytest.mark.docker
async def test_cleanup_orphans(
    docker_runtime: DockerRuntime, busybox_image: str, docker_client: Any
) -> None:
    worker = f"test-orphans-{uuid.uuid4().hex[:8]}"
    labels = {"asman": "1", "asman.worker": worker, "asman.job": worker}
    docker_client.containers.create(busybox_image, ["sleep", "30"], labels=labels).start()
    docker_client.containers.create(busybox_image, ["true"], labels=labels)
    assert await docker_runtime.cleanup_orphans(worker) == 2
    assert leftovers(docker_client, worker) == []
    assert await docker_runtime.cleanup_orphans(worker) == 0
    await docker_runtime.ping()


async def test_no_engine_is_docker_unavailable(tmp_path: Path) -> None:
    runtime = DockerRuntime(f"unix://{tmp_path}/no.sock")
    with pytest.raises(DockerUnavailable, match="no Docker engine at") as caught:
        await runtime.__aenter__()
    close_sockets_of(caught.value)


def close_sockets_of(exc: BaseException) -> None:
    """Close the sockets left in the frames of ``exc``'s chain: docker-py's
    ``UnixHTTPConnection.connect`` leaves its socket open when the connect fails, and the
    exception's frames keep it alive to the end of the run (no ``gc.collect`` frees it), where
    its unclosed-socket warning would fail the run."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        tb = e.__traceback__
        while tb is not None:
            for value in list(tb.tb_frame.f_locals.values()):
                if isinstance(value, socket.socket):
                    value.close()
            tb = tb.tb_next
        todo += [e.__cause__, e.__context__]


async def test_misuse_is_one_sentence(job_dir: JobDir) -> None:
    runtime = DockerRuntime()
    with pytest.raises(RuntimeError, match="not open"):
        await runtime.run(spec_for(job_dir, "x", ["true"]), stop=asyncio.Event())


# ---- archives -------------------------------------------------------------------------------


def add_file(tar: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tar.addfile(info)


def make_tar(path: Path, build: Callable[[tarfile.TarFile], None], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:  # type: ignore[call-overload]
        build(tar)
    return path


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda t: add_file(t, "../evil"), id="dotdot"),
        pytest.param(lambda t: add_file(t, "a/../../evil"), id="nested-dotdot"),
        pytest.param(lambda t: add_file(t, "/etc/evil"), id="absolute"),
        pytest.param(lambda t: add_link(t, "link", "/etc/passwd"), id="absolute-symlink"),
        pytest.param(lambda t: add_link(t, "link", "../../outside"), id="outside-symlink"),
        pytest.param(lambda t: add_link(t, "hard", "../x", tarfile.LNKTYPE), id="outside-hardlink"),
        pytest.param(lambda t: add_link(t, "dev", "", tarfile.CHRTYPE), id="device"),
    ],
)
def test_unpack_refuses(tmp_path: Path, build: Callable[[tarfile.TarFile], None]) -> None:
    archive = make_tar(tmp_path / "a.tar", build)
    with pytest.raises(InvalidPath):
        unpack_archive(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_unpack_refuses_symlink_chain_escape(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_link(tar, "d/b", "..")  # d/b -> . (inside)
        add_link(tar, "c", "d/b/..")  # looks like "d", resolves outside
        add_file(tar, "c/evil")

    archive = make_tar(tmp_path / "a.tar", build)
    out = tmp_path / "deep" / "out"
    with pytest.raises(InvalidPath):
        unpack_archive(archive, out)
    assert not (tmp_path / "deep" / "evil").exists()


def test_unpack_tar_gz_unwraps_single_folder(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        add_file(tar, "proj-main/Dockerfile", b"FROM scratch\n")
        add_file(tar, "proj-main/src/a.txt", b"a")
        add_link(tar, "proj-main/link", "src/a.txt")

    archive = make_tar(tmp_path / "blob", build, "w:gz")  # no extension: magic bytes decide
    root = unpack_archive(archive, tmp_path / "out")
    assert root == tmp_path / "out" / "proj-main"
    assert (root / "link").read_text() == "a"
    assert (root / "Dockerfile").is_file()


def test_unpack_zip(tmp_path: Path) -> None:
    archive = tmp_path / "ctx.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Dockerfile", "FROM scratch\n")
        zf.writestr("dir/b.txt", "b")
    root = unpack_archive(archive, tmp_path / "out")
    assert root == tmp_path / "out"
    assert (root / "dir" / "b.txt").read_text() == "b"

    for bad in ("../evil", "/abs"):
        with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
            zf.writestr(bad, "x")
        with pytest.raises(InvalidPath):
            unpack_archive(tmp_path / "bad.zip", tmp_path / f"out-{len(bad)}")

    with zipfile.ZipFile(tmp_path / "link.zip", "w") as zf:
        info = zipfile.ZipInfo("link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../etc/passwd")
    with pytest.raises(InvalidPath):
        unpack_archive(tmp_path / "link.zip", tmp_path / "out-link")


def test_unpack_bounds_size_and_members(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "a.tar", lambda t: add_file(t, "big", b"x" * 5000))
    with pytest.raises(InvalidInput, match="more than 4096 bytes"):
        unpack_archive(archive, tmp_path / "o1", max_bytes=4096)

    def many(tar: tarfile.TarFile) -> None:
        for i in range(20):
            add_file(tar, f"f{i}")

    with pytest.raises(InvalidInput, match="more than 10 members"):
        unpack_archive(make_tar(tmp_path / "m.tar", many), tmp_path / "o2", max_members=10)
    (tmp_path / "junk").write_bytes(os.urandom(600))
    with pytest.raises(InvalidInput, match=r"not a \.tar"):
        unpack_archive(tmp_path / "junk", tmp_path / "o3")
