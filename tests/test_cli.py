"""The CLI through click's runner and as real subprocesses against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import pytest
from click.testing import CliRunner
from faults import ASMAN, Cli

from asman.cli import main, new_queue_name
from asman.log import jobs
from asman.log.connection import Log, LogConfig
from asman.log.definition import job_id
from asman.log.events import JobState
from asman.log.keys import PeerKey
from asman.log.server import NatsServer
from asman.peer.links import parse_link

IMAGE = "asman/busybox:local"


def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    runner = CliRunner()
    result = runner.invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def wait_job(
    nats_url: str,
    queue: str,
    jid: str,
    until: Callable[[JobState], bool],
    what: str,
    timeout: float = 60,
) -> JobState:
    """Follow the job on the log (woken by its own events, not a poll) until ``until`` holds;
    fail the test after ``timeout``, or when the job finishes without it."""

    async def follow() -> JobState | None:
        # the streams exist (the CLI made them): never create them with other numbers
        config = LogConfig(servers=(nats_url,), manage_streams=False)
        async with Log(config, PeerKey.generate()) as log, asyncio.timeout(timeout):
            last = None
            async for state in jobs.watch_job(log, queue, jid):
                last = state
                if until(state):
                    break
            return last

    try:
        state = asyncio.run(follow())
    except TimeoutError:
        pytest.fail(f"job {jid[:12]} on {queue}: not {what} after {timeout:.0f}s")
    if state is None or not until(state):
        reason = state.reason if state is not None else None
        pytest.fail(f"job {jid[:12]} on {queue} finished ({reason}) without being {what}")
    return state


def started(state: JobState) -> bool:
    return state.started_ms is not None


def finished(state: JobState) -> bool:
    return state.finished


def wait_containers_gone(label: str, timeout: float = 30) -> None:
    """Until no container carries ``label``: the engine's destroy events (those since just
    before the listing, then live ones), not a poll; fails after ``timeout``."""
    client = docker.from_env()
    try:
        since = int(time.time()) - 1
        left = {c.id for c in client.containers.list(all=True, filters={"label": label})}
        if left:
            events = client.events(
                since=since,
                until=int(time.time() + timeout),
                decode=True,
                filters={"type": "container", "event": "destroy", "label": label},
            )
            try:
                for event in events:
                    left.discard(event.get("id"))
                    if not left:
                        break
            finally:
                events.close()
        assert not left, f"containers labelled {label} still there after {timeout:.0f}s"
    finally:
        client.close()


@pytest.fixture
def procs(tmp_path: Path, nats_server: NatsServer) -> Iterator[Cli]:
    p = Cli(tmp_path, nats_server.url, verbose=False)
    try:
        yield p
    finally:
        p.stop_all()


# -- no servers --------------------------------------------------------------------------


def test_queue_new_is_an_unguessable_valid_name() -> None:
    code, out, _ = run_cli("queue", "new")
    assert code == 0
    name = out.strip()
    assert len(name) == 26 and name.isalnum() and name == name.lower()
    assert new_queue_name() != new_queue_name()


def test_url_link_opens_to_the_same_definition_and_id() -> None:
    code, out, _ = run_cli("url", IMAGE, "-q", "myq", "--env", "A=1", "--", "echo", "hello world")
    assert code == 0
    definition, queue = parse_link(out.strip())
    assert queue == "myq"
    assert definition == {"image": IMAGE, "command": "echo 'hello world'", "env": {"A": "1"}}
    code, out, _ = run_cli("url", IMAGE, "--json", "--", "true")
    data = json.loads(out)
    assert data["job_id"] == job_id({"image": IMAGE, "command": "true"})


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["submit", "bad.queue", IMAGE], 2, "queue name 'bad.queue' is not valid"),
        (["submit", "q", IMAGE, "-f", "/nonexistent/file"], 2, "does not exist"),
        (["submit", "q", "--definition", "{bad"], 2, "cannot read --definition"),
        (["submit", "q", IMAGE, "--env", "NOVALUE"], 2, "must be NAME=VALUE"),
        (["submit", "q"], 2, "give an IMAGE"),
        (["url", IMAGE, "--max-duration", "forever"], 2, "maxDuration"),
    ],
)
def test_bad_input_is_one_line_and_a_documented_code(
    args: list[str], code: int, message: str, tmp_path: Path
) -> None:
    env = {"HOME": str(tmp_path), "ASMAN_NATS_URL": "nats://127.0.0.1:1"}
    got, _, err = run_cli(*args, env=env)
    assert got == code
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_malformed_definition_json(tmp_path: Path) -> None:
    bad = tmp_path / "def.json"
    bad.write_text('{"image": "x",')
    got, _, err = run_cli(
        "submit",
        "q",
        "--definition",
        str(bad),
        env={"HOME": str(tmp_path), "ASMAN_NATS_URL": "nats://127.0.0.1:1"},
    )
    assert got == 2 and "is not valid JSON" in err and "line 1" in err


def test_unreachable_nats_is_exit_3(tmp_path: Path) -> None:
    got, _, err = run_cli(
        "submit", "q", IMAGE, env={"HOME": str(tmp_path), "ASMAN_NATS_URL": "nats://127.0.0.1:1"}
    )
    assert got == 3
    assert "cannot reach NATS at nats://127.0.0.1:1" in err
    assert len(err.strip().splitlines()) == 1


# -- real servers ------------------------------------------------------------------------


@pytest.mark.docker
def test_submit_wait_with_files_outputs_and_exit_code(
    procs: Cli, tmp_path: Path, busybox_image: str
) -> None:
    procs.start("worker", "cliq", "--slots", "2", "--data-dir", str(tmp_path / "w"), log="w.log")
    small = tmp_path / "small.txt"
    small.write_text("tiny\n")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(300_000))
    folder = tmp_path / "tree"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "leaf.txt").write_text("leaf\n")
    done = procs.run(
        "submit",
        "cliq",
        IMAGE,
        "-f",
        str(small),
        "-f",
        f"{big}=data/big.bin",
        "-f",
        str(folder),
        "--wait",
        "-o",
        str(tmp_path / "out"),
        "--",
        "sh",
        "-c",
        "cat /inputs/small.txt; cp /inputs/data/big.bin /outputs/; "
        "mkdir -p /outputs/n && cp /inputs/tree/sub/leaf.txt /outputs/n/; echo oops >&2; exit 7",
    )
    assert done.returncode == 7, done.stderr.decode()
    assert done.stdout == b"tiny\n"
    assert b"oops" in done.stderr
    assert (tmp_path / "out" / "big.bin").read_bytes() == big.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    # a downloaded blob gets the mode a plainly written file gets, not the temp file's 0600
    assert (tmp_path / "out" / "big.bin").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "out" / "n" / "leaf.txt").read_text() == "leaf\n"
    # the same job again: cached, not run twice, same id
    again = procs.run(
        "submit",
        "cliq",
        IMAGE,
        "-f",
        str(small),
        "-f",
        f"{big}=data/big.bin",
        "-f",
        str(folder),
        "--json",
        "--",
        "sh",
        "-c",
        "cat /inputs/small.txt; cp /inputs/data/big.bin /outputs/; "
        "mkdir -p /outputs/n && cp /inputs/tree/sub/leaf.txt /outputs/n/; "
        "echo oops >&2; exit 7",
    )
    data = json.loads(again.stdout)
    assert data["cached"] is True and data["state"] == "finished"
    ls = procs.run("jobs", "ls", "cliq", "--json")
    jobs_listed = json.loads(ls.stdout)
    assert [j["job_id"] for j in jobs_listed] == [data["job_id"]]
    assert jobs_listed[0]["exit_code"] == 7
    watch = procs.run("watch", "cliq", "--once")
    assert watch.returncode == 0 and data["job_id"][:12].encode() in watch.stdout


@pytest.mark.docker
def test_cancel_from_the_cli(
    procs: Cli, tmp_path: Path, nats_server: NatsServer, busybox_image: str
) -> None:
    procs.start("worker", "cq2", "--data-dir", str(tmp_path / "w"), log="w.log")
    sub = procs.run("submit", "cq2", IMAGE, "--", "sleep", "60")
    jid = sub.stdout.decode().strip()
    # a running job: cancelling a queued one is another path (test_log.py)
    wait_job(nats_server.url, "cq2", jid, started, "started")
    cancel = procs.run("jobs", "cancel", "cq2", jid)
    assert cancel.returncode == 0, cancel.stderr.decode()
    done = wait_job(nats_server.url, "cq2", jid, finished, "finished")
    assert done.reason == "cancelled"
    assert done.result is not None and done.result.worker  # its worker stopped it
    show = json.loads(procs.run("jobs", "show", "cq2", jid, "--json").stdout)
    assert show["reason"] == "cancelled"
    # `submit --wait` on a job that gets cancelled exits with the documented 130
    waiting = subprocess.Popen(
        [ASMAN, "submit", "cq2", IMAGE, "--wait", "--", "sleep", "61"],
        env=procs.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    procs.procs.append(waiting)
    jid2 = job_id({"image": IMAGE, "command": "sleep 61"})
    wait_job(nats_server.url, "cq2", jid2, started, "started")
    assert procs.run("jobs", "cancel", "cq2", jid2).returncode == 0
    _, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 130, err.decode()


def test_namespaces_from_the_cli(procs: Cli) -> None:
    """`submit --namespace` holds the job for a namespace, a newer job there replaces the
    older (compute-queues' JobReplacedByClient), and `jobs cancel --namespace` removes one
    namespace: the job is cancelled only when none holds it. No worker: queued jobs."""

    def show(jid: str) -> dict[str, object]:
        shown = procs.run("jobs", "show", "nsq", jid, "--json")
        assert shown.returncode == 0, shown.stderr.decode()
        return dict(json.loads(shown.stdout))

    for n in ("b", "a"):
        sub = procs.run("submit", "nsq", IMAGE, "--namespace", n, "--", "sleep", "60")
        assert sub.returncode == 0, sub.stderr.decode()
    jid = sub.stdout.decode().strip()
    assert show(jid)["namespaces"] == ["a", "b"]

    newer = procs.run("submit", "nsq", IMAGE, "--namespace", "a", "--json", "--", "sleep", "61")
    told = json.loads(newer.stdout)
    assert told["namespace"] == "a" and told["replaced"] == [jid], newer.stderr.decode()
    assert show(jid)["namespaces"] == ["b"] and show(jid)["state"] == "queued"

    cancel = procs.run("jobs", "cancel", "nsq", jid, "--namespace", "zz")
    assert cancel.returncode == 2 and b"does not hold job" in cancel.stderr
    cancel = procs.run("jobs", "cancel", "nsq", jid, "--namespace", "b")
    assert cancel.returncode == 0, cancel.stderr.decode()
    assert show(jid)["reason"] == "cancelled" and show(jid)["namespaces"] == []
    other = show(told["job_id"])
    assert other["namespaces"] == ["a"] and other["state"] == "queued"
    # replaced: its result names the job that replaced it
    last = procs.run("submit", "nsq", IMAGE, "--namespace", "a", "--", "sleep", "62")
    assert "replaces job" in last.stderr.decode()
    assert show(told["job_id"])["replaced_by"] == last.stdout.decode().strip()


@pytest.mark.docker
@pytest.mark.slow
def test_worker_killed_mid_job_another_finishes_it(
    procs: Cli, tmp_path: Path, nats_server: NatsServer, busybox_image: str
) -> None:
    first = procs.start(
        "worker", "crash", "--lease-ttl", "3s", "--data-dir", str(tmp_path / "w1"), log="w1.log"
    )
    sub = procs.run(
        "submit", "crash", IMAGE, "--", "sh", "-c", "sleep 4; echo survived > /outputs/r"
    )
    jid = sub.stdout.decode().strip()
    wait_job(nats_server.url, "crash", jid, started, "started")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    # the orphan container of the dead worker is still there until cleanup
    procs.start(
        "worker", "crash", "--lease-ttl", "3s", "--data-dir", str(tmp_path / "w2"), log="w2.log"
    )
    done = procs.run(
        "submit",
        "crash",
        IMAGE,
        "--wait",
        "-o",
        str(tmp_path / "out"),
        "--",
        "sh",
        "-c",
        "sleep 4; echo survived > /outputs/r",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    assert (tmp_path / "out" / "r").read_text() == "survived\n"
    show = json.loads(procs.run("jobs", "show", "crash", jid, "--json").stdout)
    finished = [h for h in show["history"] if h["type"] == "finished" and h["accepted"]]
    assert len(finished) == 1
    assert show["attempts"] == 2
    # a fresh worker on the first worker's data dir removes its orphans at start
    procs.start("worker", "crash", "--data-dir", str(tmp_path / "w1"), "--once", log="w3.log")
    wait_containers_gone(f"asman.job={jid}")


@pytest.mark.docker
def test_worker_once_runs_one_job_and_exits(procs: Cli, tmp_path: Path, busybox_image: str) -> None:
    worker = procs.start(
        "worker", "onceq", "--once", "--data-dir", str(tmp_path / "w"), log="once.log"
    )
    done = procs.run("submit", "onceq", IMAGE, "--wait", "--", "echo", "one")
    assert done.returncode == 0 and done.stdout == b"one\n"
    assert worker.wait(60) == 0
    # a second job waits: nobody is left on the queue
    sub = procs.run("submit", "onceq", IMAGE, "--json", "--", "echo", "two")
    assert json.loads(sub.stdout)["state"] == "queued"


def test_config_file_keys_are_option_names_and_flags_and_env_win(tmp_path: Path) -> None:
    """Precedence: flag > ASMAN_* variable > config file > default, through the real entry
    point (`asman`), with the config file's keys spelled as the options are."""
    config = tmp_path / "config.toml"
    config.write_text('nats = "nats://127.0.0.1:1"\n[worker]\nmax-job-duration = "2h"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASMAN_")}
    env.update(HOME=str(tmp_path), ASMAN_CONFIG=str(config))

    def submit(*extra: str, **more_env: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [ASMAN, "submit", "q", IMAGE, *extra],
            env={**env, **more_env},
            capture_output=True,
            timeout=60,
        )

    from_file = submit()
    assert from_file.returncode == 3 and b"nats://127.0.0.1:1" in from_file.stderr
    from_env = submit(ASMAN_NATS_URL="nats://127.0.0.1:2")
    assert from_env.returncode == 3 and b"nats://127.0.0.1:2" in from_env.stderr
    from_flag = submit("--nats", "nats://127.0.0.1:3", ASMAN_NATS_URL="nats://127.0.0.1:2")
    assert from_flag.returncode == 3 and b"nats://127.0.0.1:3" in from_flag.stderr
    shown = subprocess.run([ASMAN, "worker", "--help"], env=env, capture_output=True, timeout=60)
    assert "[default: 2h]" in " ".join(shown.stdout.decode().split())  # help text wraps

    config.write_text('natz = "nats://127.0.0.1:1"\n')
    bad = submit()
    assert bad.returncode == 2
    assert bad.stderr.decode().strip() == (
        "asman: config file: natz is not an option of any asman command (see docs/reference/cli.md)"
    )
