"""Rough edges a new user hit (issue 15): short retentions, docs that named options and routes
that do not exist, where ``--wait`` puts outputs, ``asman url`` beside ``asman dev`` on
another port, and blank lines in build logs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from asman.cli import main
from asman.gateway import create_app
from asman.gateway.config import GatewayConfig
from asman.log.connection import Log, LogConfig
from asman.log.jobs import read_job, submit
from asman.log.keys import PeerKey
from asman.log.server import free_port
from asman.peer.dockerbuild import BuildLines

ROOT = Path(__file__).resolve().parents[1]
ASMAN = str(Path(sys.executable).parent / "asman")
QUEUE = "rough-edges-q"


def run_asman(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ASMAN, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


# -- 1. --retention under 2 minutes --------------------------------------------------------


async def test_a_log_kept_one_minute_connects_and_takes_a_job(
    nats_url: str, tmp_path: Path
) -> None:
    # JetStream refuses a duplicates window longer than the max age (err 10052): the
    # streams' windows must shrink with the retention
    key = PeerKey.load_or_create(tmp_path / "peer.key")
    async with Log(LogConfig(servers=(nats_url,), retention_s=60), key) as log:
        done = await submit(log, QUEUE, {"image": "busybox", "command": "echo hi"})
        assert done.created
        state = await read_job(log, QUEUE, done.job_id)
        assert state is not None and state.state == "queued"


def test_a_refused_gateway_start_is_one_line_and_prints_no_url(nats_url: str) -> None:
    port = str(free_port())
    # JetStream refuses the streams (one server cannot hold 3 replicas)
    done = run_asman("gateway", "--nats", nats_url, "--port", port, "--replicas", "3")
    assert done.returncode != 0
    assert "gateway on" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "replicas" in done.stderr, done.stderr
    # a retention JetStream cannot keep is refused before anything starts, in one line
    done = run_asman("gateway", "--nats", nats_url, "--port", port, "--retention", "99999999d")
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1 and "--retention is at most" in done.stderr, done.stderr


# -- 2. docs/reference/environment.md names real options ------------------------------------


def _options_by_variable(cmd: click.Command, path: str) -> dict[str, dict[str, set[str]]]:
    """{variable: {command path: its flags}}"""
    found: dict[str, dict[str, set[str]]] = {}
    for p in cmd.params:
        if isinstance(p, click.Option) and p.envvar:
            found.setdefault(str(p.envvar), {})[path] = set(p.opts + p.secondary_opts)
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            for var, where in _options_by_variable(sub, f"{path} {name}").items():
                found.setdefault(var, {}).update(where)
    return found


def test_every_flag_in_the_environment_reference_is_in_help() -> None:
    options = _options_by_variable(main, "asman")
    text = (ROOT / "docs" / "reference" / "environment.md").read_text()
    wrong = []
    for var, flag, commands in re.findall(
        r"^\| `(ASMAN_\w+)` \| ([^|]+) \| ([^|]+) \|", text, re.M
    ):
        if flag.strip() == "—":
            continue
        flags = set(re.findall(r"--[a-z][a-z-]*", flag))
        where = options.get(var, {})
        # the commands that take the flag (a note in parentheses may name others)
        named = re.findall(r"`(asman [a-z ]+?)`", re.sub(r"\(.*?\)", "", commands))
        for command in named or list(where):
            if not flags or not flags <= where.get(command, set()):
                wrong.append(f"{var} {flag.strip()} in {command}")
    assert wrong == []


# -- 3. the docs name routes the gateway serves ---------------------------------------------


def test_every_api_route_the_docs_name_is_served(tmp_path: Path) -> None:
    app = create_app(GatewayConfig(log=LogConfig(), key_path=tmp_path / "gateway.key"))
    served = [
        re.compile("^" + re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(r.canonical)) + "$")
        for r in app.router.resources()
    ]
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    unknown = []
    for doc in docs:
        for path in re.findall(r"/api/v1/[^\s`)'\"?,|]*", doc.read_text()):
            # placeholders as the docs write them: <queue>, {queue}, QUEUE, …
            concrete = re.sub(r"<[^>]*>|\{[^}]*\}|…|\.\.\.", "x", path).rstrip(".:")
            if not any(r.match(concrete) for r in served):
                unknown.append(f"{doc.relative_to(ROOT)}: {path}")
    assert unknown == []


# -- 4. where --wait puts the outputs ---------------------------------------------------------


def test_the_docs_say_where_wait_puts_outputs() -> None:
    # the CLI writes to ./outputs/<job id>[:12], the id it prints ("job 082e5ae5f2c7: success")
    readme = (ROOT / "README.md").read_text()
    runner = CliRunner()
    submit_help = runner.invoke(main, ["submit", "--help"], terminal_width=200).output
    outputs_help = runner.invoke(main, ["jobs", "outputs", "--help"], terminal_width=200).output
    for text in (" ".join(readme.split()), submit_help, outputs_help):
        assert "./outputs/<job id>" not in text
        assert "./outputs/<short id>" in text and "the first 12 characters" in text


# -- 5. asman url finds the gateway of asman dev ------------------------------------------


def test_asman_url_points_at_the_gateway_asman_dev_runs(tmp_path: Path) -> None:
    data = tmp_path / "dev"
    http_port = free_port()
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "share"),
        "ASMAN_DATA_DIR": str(data),
        "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock",  # no worker: quicker
    }
    env.pop("ASMAN_GATEWAY_URL", None)
    url_args = ("url", "busybox", "-q", QUEUE, "--", "echo", "hi")
    assert run_asman(*url_args, env=env).stdout.startswith("http://127.0.0.1:8080/")
    proc = subprocess.Popen(
        [ASMAN, "dev", "--nats-port", str(free_port()), "--http-port", str(http_port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    up = threading.Event()
    output: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        with proc.stderr:
            for line in proc.stderr:
                output.append(line)
                if "asman dev is up" in line:
                    up.set()
        up.set()  # its output ended: it exited

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    url_file = data / "gateway-url"
    try:
        assert up.wait(60) and proc.poll() is None, "".join(output)
        deadline = time.monotonic() + 30
        while not url_file.exists():  # written once the gateway listens
            assert proc.poll() is None and time.monotonic() < deadline, "".join(output)
            time.sleep(0.05)
        link = run_asman(*url_args, env=env).stdout
        assert link.startswith(f"http://127.0.0.1:{http_port}/#?job="), link
        # a flag or ASMAN_GATEWAY_URL still wins
        other = run_asman(*url_args, env={**env, "ASMAN_GATEWAY_URL": "https://gw.example"})
        assert other.stdout.startswith("https://gw.example/")
    finally:
        proc.send_signal(signal.SIGINT)  # by its PID
        proc.wait(60)
        reader.join(10)
    # once it stopped, the link goes back to the default
    assert not url_file.exists()
    assert run_asman(*url_args, env=env).stdout.startswith("http://127.0.0.1:8080/")


# -- 7. build log lines ----------------------------------------------------------------------

# the ``stream`` texts of a real legacy-builder answer (docker 26) for
#   FROM asman/busybox:local
#   RUN echo hi; echo; printf 'a'; sleep 0.3; echo b
#   RUN echo there
BUILD_STREAM = [
    "Step 1/3 : FROM asman/busybox:local",
    "\n",
    " ---> 2dee8fd6a30a\n",
    "Step 2/3 : RUN echo hi; echo; printf 'a'; sleep 0.3; echo b",
    "\n",
    " ---> Running in 5b9eabf6cd94\n",
    "hi\n\na",
    "b\n",
    "Removing intermediate container 5b9eabf6cd94\n",
    " ---> 204f08d6e2ae\n",
    "Step 3/3 : RUN echo there",
    "\n",
    " ---> Running in 3e50f4115529\n",
    "there\n",
    "Removing intermediate container 3e50f4115529\n",
    " ---> 21ff8641bcd3\n",
    "Successfully built 21ff8641bcd3\n",
    "Successfully tagged asman-test-blank:1\n",
]


def test_build_output_has_no_blank_lines_between_steps_and_keeps_whole_lines() -> None:
    lines = BuildLines()
    out = [line for chunk in BUILD_STREAM for line in lines.feed(chunk)] + lines.close()
    assert out == [
        "Step 1/3 : FROM asman/busybox:local",
        " ---> 2dee8fd6a30a",
        "Step 2/3 : RUN echo hi; echo; printf 'a'; sleep 0.3; echo b",
        " ---> Running in 5b9eabf6cd94",
        "hi",
        "",  # the RUN step's own `echo`
        "ab",  # one line, written in two parts
        "Removing intermediate container 5b9eabf6cd94",
        " ---> 204f08d6e2ae",
        "Step 3/3 : RUN echo there",
        " ---> Running in 3e50f4115529",
        "there",
        "Removing intermediate container 3e50f4115529",
        " ---> 21ff8641bcd3",
        "Successfully built 21ff8641bcd3",
        "Successfully tagged asman-test-blank:1",
    ]


def test_build_output_without_a_last_line_end_and_with_crlf() -> None:
    lines = BuildLines()
    assert lines.feed("one\r\ntw") == ["one"]
    assert lines.feed("o") == []
    assert lines.close() == ["two"]
    assert lines.close() == []


@pytest.mark.parametrize("size", [70_000])
def test_a_build_line_without_end_comes_out_in_bounded_pieces(size: int) -> None:
    lines = BuildLines()
    out = lines.feed("x" * size)
    assert out and all(len(line) <= 64 * 1024 for line in out)
    assert "".join(out + lines.close()) == "x" * size
