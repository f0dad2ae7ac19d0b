"""Every ``asman`` command README.md and docs/guide.md show, run against a live stack, so the
docs cannot drift from the code again (issue 15).

The fenced shell blocks of both files are parsed; each line that starts with ``asman `` (or
``.venv/bin/asman ``; in a ``console`` block, ``$ asman ``), or sets a variable to one
(``Q=$(asman queue new)``), is a command. Each must be listed in ``COMMANDS`` (how this test
runs it) or ``SKIPPED`` (why it cannot run here): a command the docs gain that the test does
not know fails it, saying to add it. The stack is the README's own ``asman dev`` (on free
ports, in a temporary home); placeholders take values from it: ``QUEUE`` its queue (for the
private-queue commands, ``ON_PRIVATE_QUEUE``, the queue ``asman queue new --private``
printed), ``JOB`` the job the last ``asman submit`` printed, ``HUB:4222`` its NATS server,
``URL`` a webhook receiver on 127.0.0.1, ``WORKER_KEY``, ``INSTITUTION_KEY`` and ``KEY``
what ``asman keys --create`` prints in a home of their own (the worker's, the
institution's, another admin's), and ``[QUEUE…]`` (an optional repeat) nothing. A command
runs in the owner's home unless ``RUN_BY`` names another. A command exits 0 unless the docs
say otherwise in its comment (``# exits 3``).
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from faults import Announcing
from receiver import Receiver

from asman.log import subjects
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.server import free_port

ROOT = Path(__file__).resolve().parents[1]
ASMAN = str(Path(sys.executable).parent / "asman")
DOCS = ("README.md", "docs/guide.md")
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}

STACK = "the live stack: started first, the other commands run against it, stopped last"
RUN = "run to its end"
SERVE = "long-running: started, seen serving (its heartbeat on the queue), stopped by SIGTERM"

#: every command the docs show, and how this test runs it
COMMANDS: dict[str, str] = {
    ".venv/bin/asman dev": STACK,
    "asman queue new": RUN,
    "asman submit QUEUE asman/busybox:local -f data.csv --wait -- sh -c "
    "'wc -l /inputs/data.csv > /outputs/n'": RUN,
    "asman submit QUEUE asman/busybox:local -- echo hi": RUN,
    "asman watch QUEUE": RUN,  # not on a terminal, it prints the table once and exits
    "asman jobs logs QUEUE JOB -f": RUN,
    "asman jobs outputs QUEUE JOB -o out/": RUN,
    "asman jobs cancel QUEUE JOB": RUN,
    "asman url asman/busybox:local -q QUEUE -- echo hi": RUN,
    "asman worker QUEUE --nats nats://HUB:4222 --slots 4": SERVE,
    "asman submit QUEUE asman/busybox:local --wait -- sh -c 'echo oops >&2; exit 3'": RUN,
    "asman submit QUEUE asman/busybox:local --on-queued URL --on-finished URL -- echo done": RUN,
    "asman worker QUEUE [QUEUE…] --slots 4 --max-job-duration 2h --memory 8g": SERVE,
    # docs/guide.md, "Open and private queues"
    "asman queue new --private": RUN,
    "asman queue trust QUEUE WORKER_KEY": RUN,
    "asman queue policy set QUEUE --submit anyone": RUN,
    "asman queue policy set QUEUE --admin KEY": RUN,
    "asman queue policy set QUEUE --max-duration 2h --max-memory 8g --image 'ghcr.io/mylab/*' "
    "--no-network": RUN,
    "asman queue policy show QUEUE": RUN,
    "asman queue untrust QUEUE WORKER_KEY": RUN,
    "asman queue policy set QUEUE --workers none --certifier INSTITUTION_KEY": RUN,
    "asman certify WORKER_KEY --for 30d -o worker.cert": RUN,
    "asman worker QUEUE --cert worker.cert": SERVE,
}
#: the commands whose QUEUE is the private queue ``asman queue new --private`` made
ON_PRIVATE_QUEUE = {
    "asman queue trust QUEUE WORKER_KEY",
    "asman queue policy set QUEUE --submit anyone",
    "asman queue policy set QUEUE --admin KEY",
    "asman queue policy set QUEUE --max-duration 2h --max-memory 8g --image 'ghcr.io/mylab/*' "
    "--no-network",
    "asman queue policy show QUEUE",
    "asman queue untrust QUEUE WORKER_KEY",
    "asman queue policy set QUEUE --workers none --certifier INSTITUTION_KEY",
    "asman worker QUEUE --cert worker.cert",
}
#: whose home (key, config, data, working directory) a command runs in, when not the owner's
RUN_BY = {
    "asman certify WORKER_KEY --for 30d -o worker.cert": "institution",
    "asman worker QUEUE --cert worker.cert": "worker",
}
#: the homes besides the owner's, each with its own key, and the placeholder of that key
KEY_OF = {"worker": "WORKER_KEY", "institution": "INSTITUTION_KEY", "admin": "KEY"}

PUBLIC = (
    "runs against the public server nats://queues.example.org:4222, and tests talk to this "
    "machine only; tests/federation/test_public.py runs the same commands against a public "
    "server (deploy/nats/public, with its auth callout) on 127.0.0.1"
)
#: commands the docs show that cannot run in a test, and why
SKIPPED: dict[str, str] = {
    "asman worker $QUEUE --network bridge --slots 2 &": (
        "the Snakemake example's worker: it needs the Snakemake image and an S3 store its "
        "jobs reach over a bridge network; tests/gateway/test_tes_snakemake.py runs that "
        "whole example (the same worker options and Snakefile)"
    ),
    "asman worker $Q --nats nats://queues.example.org:4222 &": PUBLIC,
    "asman submit $Q asman/busybox:local --nats nats://queues.example.org:4222 --wait -- echo hi": (
        PUBLIC
    ),
}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # the command, without its comment
    exits: int  # 0, or what its comment says (`# exits 3`)


def doc_commands() -> list[DocCommand]:
    """The ``asman`` commands of the docs' fenced shell blocks, in document order."""
    found = []
    for doc in DOCS:
        block: str | None = None
        for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1):
            fence = re.match(r"\s*```(\w*)", line)
            if fence:
                block = fence.group(1) if block is None else None
                continue
            code, comment = _split_comment(line)
            if block == "console":  # a prompt's line is a command, the others its output
                if not code.startswith("$ "):
                    continue
                code = code[2:].strip()
            assigned = re.fullmatch(r"[A-Za-z_]\w*=\$\((.*)\)", code)  # Q=$(asman queue new)
            if assigned:
                code = assigned.group(1).strip()
            first = code.split(maxsplit=1)[0] if code else ""
            if block not in SHELL_BLOCKS or Path(first).name != "asman":
                continue
            exits = re.search(r"\bexits (\d+)", comment)
            found.append(DocCommand(f"{doc}:{n}", code, int(exits.group(1)) if exits else 0))
    return found


def _split_comment(line: str) -> tuple[str, str]:
    """``line`` and its comment: from the first ``#`` outside quotes that starts a word."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1 :].strip()
    return line.strip(), ""


def test_every_command_in_the_docs_is_known_to_this_test() -> None:
    commands = doc_commands()
    assert commands, "no asman command found in the docs: is the parser broken?"
    unknown = [c for c in commands if c.text not in COMMANDS and c.text not in SKIPPED]
    assert not unknown, "\n".join(
        f"{c.where} shows `{c.text}`, which tests/test_doc_commands.py does not know: add it "
        "to COMMANDS (how to run it against the live stack) or SKIPPED (why it cannot run)"
        for c in unknown
    )
    shown = {c.text for c in commands}
    stale = sorted((set(COMMANDS) | set(SKIPPED)) - shown)
    assert not stale, f"no longer in the docs, remove from tests/test_doc_commands.py: {stale}"
    assert [c.text for c in commands if COMMANDS.get(c.text) == STACK] == [".venv/bin/asman dev"]


# -- running them -------------------------------------------------------------------------


@dataclass
class Live:
    """The state the commands share: the stack's values and what earlier commands printed."""

    home: Path
    env: dict[str, str]
    nats_url: str = ""
    gateway_url: str = ""
    queue: str = ""
    private_queue: str = ""
    job: str = ""
    receiver_url: str = ""
    #: the other homes (``KEY_OF``): their folder and environment, and their keys
    homes: dict[str, tuple[Path, dict[str, str]]] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    checks: list[Callable[[], Any]] = field(default_factory=list)

    def home_of(self, text: str) -> tuple[Path, dict[str, str]]:
        """Where the command runs: its home (its working directory) and environment."""
        who = RUN_BY.get(text)
        return self.homes[who] if who else (self.home, self.env)

    def queue_of(self, text: str) -> str:
        return self.private_queue if text in ON_PRIVATE_QUEUE else self.queue

    def argv(self, text: str) -> list[str]:
        """The command with its placeholders filled in; an unknown placeholder fails."""
        nats = self.nats_url.removeprefix("nats://")
        queue = self.queue_of(text)
        text = text.replace(" [QUEUE…]", "").replace("HUB:4222", nats)
        values = {"QUEUE": queue, "JOB": self.job, "URL": self.receiver_url} | self.keys
        out = []
        for token in shlex.split(text):
            if re.fullmatch(r"[A-Z][A-Z_]+…?", token):
                assert values.get(token), f"placeholder {token} in `{text}` has no value yet"
                token = values[token]
            out.append(token)
        out[0] = ASMAN
        return out


async def _beat_of(live: Live, worker: str, queue: str) -> Callable[[], Any]:
    """Subscribe to ``queue``'s heartbeats now; the returned coroutine function waits for one
    from ``worker`` (a peer id)."""
    log = Log(LogConfig(servers=(live.nats_url,)), PeerKey.generate())
    await log.connect()
    got = asyncio.Event()

    async def on_beat(msg: Any) -> None:
        if msg.subject.split(".")[3] == worker:
            got.set()

    sub = await log.nc.subscribe(subjects.workers_filter(queue), cb=on_beat)

    async def wait() -> None:
        try:
            async with asyncio.timeout(60):
                await got.wait()
        finally:
            await sub.unsubscribe()
            await log.close()

    return wait


def _run(
    live: Live, argv: list[str], where: tuple[Path, dict[str, str]] | None = None
) -> subprocess.CompletedProcess[str]:
    cwd, env = where or (live.home, live.env)
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _home(root: Path, base: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A home of its own (its key, config and data), for a command another person runs."""
    root.mkdir()
    env = base | {
        "HOME": str(root),
        "XDG_CONFIG_HOME": str(root / ".config"),
        "XDG_DATA_HOME": str(root / ".local" / "share"),
    }
    return root, env


@pytest.mark.docker
@pytest.mark.slow
async def test_every_command_in_the_docs_runs(tmp_path: Path, busybox_image: str) -> None:
    commands = [c for c in doc_commands() if c.text not in SKIPPED]
    unknown = [c.where for c in commands if c.text not in COMMANDS]
    assert not unknown, f"commands this test does not know, at {unknown} (see the other test)"
    nats_port, http_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith("ASMAN_")}
    base["ASMAN_NATS_URL"] = f"nats://127.0.0.1:{nats_port}"
    home, env = _home(tmp_path / "home", base)
    (home / "data.csv").write_text("name,n\na,1\nb,2\n")  # the file the README's -f names
    live = Live(home, env, nats_url=env["ASMAN_NATS_URL"])
    for who, placeholder in KEY_OF.items():  # the worker's, the institution's, an admin's
        live.homes[who] = _home(tmp_path / who, base)
        made = _run(live, [ASMAN, "keys", "--create"], live.homes[who])
        assert made.returncode == 0, made.stderr
        live.keys[placeholder] = made.stdout.strip()
    live.gateway_url = f"http://127.0.0.1:{http_port}"
    receiver = await Receiver().start()
    live.receiver_url = receiver.url("/hook")
    stack: Announcing | None = None
    ran: list[str] = []
    try:
        for c in commands:
            how = COMMANDS[c.text]
            argv = live.argv(c.text)
            if how == STACK:
                # on free ports, and letting its services call back the test's receiver
                argv += ["--nats-port", str(nats_port), "--http-port", str(http_port)]
                argv += ["--allow-url", f"127.0.0.1:{receiver.port}"]
                # ready once its whole banner is out (the last line), which the checks read
                stack = Announcing(
                    argv, tmp_path / "dev.log", r"^Ctrl-C stops it", env=env, cwd=home
                )
                assert await asyncio.to_thread(stack.seen.wait, 120), stack.text()
                assert stack.proc.poll() is None, f"{c.where}: `{c.text}` exited: {stack.text()}"
                live.queue = (home / ".local/share/asman/dev/queue").read_text().strip()
                assert f"127.0.0.1:{receiver.port}" in stack.text()  # its banner says so
            elif how == SERVE:
                cwd, its_env = live.home_of(c.text)
                me = _run(live, [ASMAN, "keys", "--create"], (cwd, its_env)).stdout.strip()
                beat = await _beat_of(live, me, live.queue_of(c.text))
                log = tmp_path / f"serve{len(ran)}.log"
                served = Announcing(argv, log, r"^worker ", env=its_env, cwd=cwd)
                try:
                    await beat()
                finally:
                    code = await asyncio.to_thread(served.stop)
                assert code == c.exits, f"{c.where}: `{c.text}` exited {code}: {served.text()}"
                # a worker the queue's policy does not trust says so in one line: none here
                assert "ask the queue's owner" not in served.text(), served.text()
                assert "certificate is not valid" not in served.text(), served.text()
            else:
                done = await asyncio.to_thread(_run, live, argv, live.home_of(c.text))
                said = f"{c.where}: `{c.text}` exited {done.returncode}:\n{done.stderr}"
                assert done.returncode == c.exits, said
                _check(live, c.text, done)
            ran.append(c.text)
        # the callbacks of the guide's example: queued from the CLI, finished from the worker
        events = {(await receiver.delivered("/hook")).json["event"] for _ in range(2)}
        assert events == {"queued", "finished"}
    finally:
        await receiver.close()
        if stack is not None:
            code = await asyncio.to_thread(stack.stop, signal.SIGINT)
            assert code == 0, stack.text()
    assert ran == [c.text for c in commands]


def _check(live: Live, text: str, done: subprocess.CompletedProcess[str]) -> None:
    """What a reader of the docs would look at after each command."""
    out = done.stdout
    if text == "asman queue new":
        assert re.fullmatch(r"[a-z2-7]{26}\n", out), out
    elif text == "asman queue new --private":
        name = out.strip()
        # bound to the owner's key: <26 random base32>-<26 base32 of a hash with that key>
        assert re.fullmatch(r"[a-z2-7]{26}-[a-z2-7]{26}", name), out
        assert "private: only your key" in done.stderr, done.stderr
        live.private_queue = name
    elif text.startswith("asman queue policy show"):
        shown = _policy_rows(out)
        # what the commands before it set: a listed worker, anyone submits, another admin,
        # ceilings
        assert live.keys["WORKER_KEY"] in shown["workers"], out
        assert shown["submit"] == "anyone", out
        assert live.keys["KEY"] in shown["admins"], out
        for ceiling in ("maxDuration 7200s", "images ghcr.io/mylab/*", "no network"):
            assert ceiling in shown["ceilings"], out
    elif text.startswith("asman queue untrust"):
        assert live.keys["WORKER_KEY"] not in _policy_rows(out)["workers"], out
    elif text.startswith("asman queue policy set QUEUE --workers none"):
        shown = _policy_rows(out)  # the policy it wrote
        assert shown["workers"] == "nobody", out
        assert shown["certifiers"] == live.keys["INSTITUTION_KEY"], out
    elif text.startswith("asman certify"):
        from asman.log.policy import check_cert

        made, (worker_home, _) = live.home_of(text)[0] / "worker.cert", live.homes["worker"]
        cert = check_cert(made.read_bytes())
        assert (cert.certifier, cert.worker) == (
            live.keys["INSTITUTION_KEY"],
            live.keys["WORKER_KEY"],
        )
        (worker_home / "worker.cert").write_bytes(made.read_bytes())  # handed to the worker
    elif text.startswith("asman submit") and "--wait" not in text:
        job = out.strip()
        assert re.fullmatch(r"[0-9a-f]{64}", job), out
        live.job = job
    elif text.startswith("asman submit") and "-f data.csv" in text:
        outputs = list((live.home / "outputs").glob("*/n"))
        assert [p.read_text().split()[0] for p in outputs] == ["3"], outputs
    elif text == "asman watch QUEUE":
        assert live.queue in out and live.job[:12] in out, out
    elif text == "asman jobs logs QUEUE JOB -f":
        assert out == "hi\n", out
    elif text == "asman url asman/busybox:local -q QUEUE -- echo hi":
        assert out.startswith(f"{live.gateway_url}/#?job="), out  # the running asman dev's


def _policy_rows(out: str) -> dict[str, str]:
    """``asman queue policy show``'s rows (``  name:  value`` under ``queue <name>``)."""
    lines = out.splitlines()
    assert lines and lines[0].startswith("queue "), out
    return {k.strip(): v.strip() for k, _, v in (row.partition(":") for row in lines[1:])}
