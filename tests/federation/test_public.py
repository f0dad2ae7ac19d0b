"""A public NATS server (deploy/nats/public, issue 14): a real nats-server started from the
shipped config on loopback ports, and the real `asman callout serve` process beside it.

A stranger connects with its own connection. Anonymous, it is refused. Naming queue alpha, it
can submit, read, claim, heartbeat and write logs for alpha (a real job runs end to end with
`asman worker` and `asman submit --wait` as CLI processes, with no option but the URL), and
every enumeration attempt fails: it cannot list streams, consumers or subjects, read queue
beta, subscribe across queues, or listen on another connection's inbox.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from faults import Announcing, Cli
from nats.aio.client import Client as NATS
from refusals import Refusals
from topology import Node, Topology

from asman.errors import BlobError, LogError, NotAdmitted
from asman.log import jobs, subjects
from asman.log.callout import AUTH_CONF, CalloutSecrets, init_secrets
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.leases import WaitingIndex, claim
from asman.log.logstream import append_logs, read_logs
from asman.log.permissions import MAX_QUEUES, Capability
from asman.log.workers import WorkerInfo, beat, list_workers
from asman.peer.client import NoBlobStore

ASMAN = str(Path(sys.executable).parent / "asman")
DEF_A = {"image": "asman/busybox:local", "command": "echo alpha"}
DEF_B = {"image": "asman/busybox:local", "command": "echo beta"}


def callout_process(secrets_dir: Path, url: str, log: Path) -> Announcing:
    """``asman callout serve`` as a real process; ``seen`` once it says it answers."""
    argv = [ASMAN, "-v", "callout", "serve", "--secrets", str(secrets_dir), "--nats", url]
    return Announcing(argv, log, "admitting connections for the queues they name")


class Public:
    def __init__(self, node: Node, secrets: CalloutSecrets, callout: Announcing) -> None:
        self.node = node
        self.secrets = secrets
        self.callout = callout

    @property
    def url(self) -> str:
        return self.node.url

    @property
    def admin_url(self) -> str:
        return self.node.url_as("admin", self.secrets.admin_password)


@pytest.fixture
def public(tmp_path: Path, nats_binary: str) -> Iterator[Public]:
    """deploy/nats/public/nats.conf on loopback, its secrets made by `asman callout init`
    (the same code), and `asman callout serve` answering for it."""
    topo = Topology(tmp_path / "nats", "public", ["nats"], clustered=False)
    node = topo.nodes["nats"]
    secrets_dir = tmp_path / "nats" / "conf" / "secrets"  # beside the copied public.conf
    init_secrets(secrets_dir)
    assert (secrets_dir / AUTH_CONF).exists()
    topo.start()
    callout = callout_process(secrets_dir, node.url, tmp_path / "callout.log")
    try:
        if not callout.seen.wait(60) or callout.proc.poll() is not None:
            pytest.fail(f"asman callout did not come up: {callout.text()}")
        yield Public(node, CalloutSecrets.load(secrets_dir), callout)
    finally:
        code = callout.stop()
        topo.stop()
    assert code == 0, callout.text()


@pytest.fixture
async def admin(public: Public) -> AsyncIterator[Log]:
    """The operator's trusted user (the gateway's too): it sees every queue."""
    async with Log(LogConfig(servers=(public.admin_url,)), PeerKey.generate()) as log:
        yield log


async def _refused(url: str, **options: Any) -> str:
    nc = NATS()

    async def quiet(exc: Exception) -> None:
        pass

    try:
        with pytest.raises(nats.errors.Error) as caught:
            await nc.connect(
                url, connect_timeout=5, allow_reconnect=False, error_cb=quiet, **options
            )
    finally:
        await nc.close()
    return str(caught.value)


async def test_anonymous_and_malformed_connections_are_refused(public: Public) -> None:
    # anonymous: no user at all
    assert "Authorization Violation" in await _refused(public.url)
    # a user and password the server does not know, a queue-less or a bad capability
    secret = "a" * 32
    for user, password in (
        ("someone", "guess"),
        ("asman", secret),  # names no queue
        ("asman", f"{secret} a.b"),  # not a queue name: a subject with a dot
        ("asman", f"{secret} >"),
        ("asman", "short alpha"),  # no secret to derive an inbox from
        ("asman", " ".join([secret, *(f"q{i}" for i in range(MAX_QUEUES + 1))])),
        ("admin", "wrong"),  # the trusted user, with a wrong password
    ):
        assert "Authorization Violation" in await _refused(
            public.url, user=user, password=password
        ), user
    # through Asman, a command that names no queue is told what the server wants, in a line
    with pytest.raises(NotAdmitted) as refused:
        async with Log(LogConfig(servers=(public.url,)), PeerKey.generate()):
            pass
    assert "requires a login" in str(refused.value) and "\n" not in str(refused.value)
    assert "refused client=" in public.callout.text()


async def test_a_refused_capability_says_which_queues_it_named(
    public: Public, tmp_path: Path
) -> None:
    """With the callout gone the server admits no stranger: the client says which queue names
    it presented and what the server admits, in one line (not 'cannot reach NATS')."""
    public.callout.stop()
    (tmp_path / "home").mkdir()
    run = await asyncio.to_thread(Cli(tmp_path / "home", public.url).run, "jobs", "ls", "alpha")
    told = run.stderr.decode()
    assert run.returncode == 3 and told.count("\n") == 1, told
    assert "named queue(s) alpha: it admits only connections that name valid queues" in told
    config = LogConfig(servers=(public.url,), queues=("alpha", "beta"))
    with pytest.raises(NotAdmitted) as refused:
        async with Log(config, PeerKey.generate()):
            pass
    text = str(refused.value)
    assert "named queue(s) alpha, beta" in text
    assert "admits only connections that name valid queues" in text and "\n" not in text
    assert refused.value.queues == ("alpha", "beta")


async def test_a_stranger_naming_a_queue_submits_reads_claims_beats_and_logs(
    public: Public, admin: Log
) -> None:
    config = LogConfig(servers=(public.url,), queues=("alpha",), request_timeout_s=2.0)
    async with Log(config, PeerKey.generate()) as client, Log(config, PeerKey.generate()) as w:
        # admitted by the callout: confined, with no option but the URL and the queue
        assert client.confined and client.config.reads == "consumer"
        assert not client.config.manage_streams
        submitted = await jobs.submit(client, "alpha", DEF_A)
        assert [j.job_id for j in await jobs.list_jobs(w, "alpha")] == [submitted.job_id]
        index = await WaitingIndex(w, "alpha", asyncio.Event()).open()
        try:
            await index.scan()
            (entry,) = index.entries.values()
        finally:
            await index.close()
        lease = await claim(w, "alpha", entry.job_id, entry.entry.seq)
        assert lease is not None
        await lease.start()
        await append_logs(w, "alpha", submitted.job_id, lease.attempt, [("stdout", 0, b"hi\n")])
        await beat(w, WorkerInfo(worker_id=w.peer_id, queue="alpha", slots=1, free_slots=0))
        assert [x.worker_id for x in await list_workers(client, "alpha")] == [w.peer_id]
        final = await lease.finish({"reason": "success", "exit_code": 0})
        assert final.reason == "success"
        state = await jobs.wait_finished(client, "alpha", submitted.job_id, timeout=10)
        chunks, _ = await read_logs(client, state)
        assert [c.data for c in chunks] == [b"hi\n"]
    # the operator sees what the stranger did
    assert (await jobs.read_job(admin, "alpha", submitted.job_id)).reason == "success"
    assert "admitted client=" in public.callout.text()


async def test_a_stranger_naming_a_queue_can_enumerate_nothing(public: Public, admin: Log) -> None:
    beta = await jobs.submit(admin, "beta", DEF_B)
    await jobs.submit(admin, "alpha", DEF_A)
    other = Capability.new(["alpha", "beta"])  # another connection, which also knows beta
    nc_other = await nats.connect(
        public.url, user=other.user, password=other.password, inbox_prefix=other.inbox_prefix
    )
    mine = Capability.new(["alpha"])
    refusals = Refusals()
    nc = await _raw(refusals, public.url, mine)
    try:
        api = "$JS.API"
        jobs_stream, waiting = subjects.JOBS_STREAM, subjects.WAITING_STREAM
        denied_requests = {
            f"{api}.INFO": b"",
            f"{api}.STREAM.NAMES": b"",
            f"{api}.STREAM.LIST": b"",
            f"{api}.STREAM.INFO.{jobs_stream}": json.dumps({"subjects_filter": ">"}).encode(),
            f"{api}.STREAM.INFO.{waiting}": json.dumps({"subjects_filter": ">"}).encode(),
            f"{api}.STREAM.INFO.{subjects.WORKERS_STREAM}": b"",
            f"{api}.CONSUMER.NAMES.{jobs_stream}": b"",
            f"{api}.CONSUMER.LIST.{waiting}": b"",
            f"{api}.CONSUMER.NAMES.OBJ_{subjects.BLOBS_BUCKET}": b"",
            # payload-filtered reads: they could name any queue
            f"{api}.DIRECT.GET.{jobs_stream}": json.dumps(
                {"seq": 1, "next_by_subj": "asman.job.>", "batch": 100}
            ).encode(),
            f"{api}.DIRECT.GET.{waiting}": json.dumps(
                {"multi_last": ["asman.waiting.>"], "batch": 100}
            ).encode(),
            f"{api}.STREAM.MSG.GET.{jobs_stream}": json.dumps({"seq": 1}).encode(),
            f"{api}.DIRECT.GET.OBJ_{subjects.BLOBS_BUCKET}": json.dumps(
                {"seq": 1, "next_by_subj": ">", "batch": 10}
            ).encode(),
            # queue beta's job by its subject, and read consumers on beta or wider
            f"{api}.DIRECT.GET.{jobs_stream}.{subjects.job_subject('beta', beta.job_id)}": b"",
            f"{api}.DIRECT.GET.{jobs_stream}.asman.job.>": b"",
            f"{api}.CONSUMER.CREATE.{jobs_stream}.x.asman.job.beta.*": b"{}",
            f"{api}.CONSUMER.CREATE.{jobs_stream}.x.asman.job.*.*": b"{}",
            f"{api}.CONSUMER.CREATE.{jobs_stream}.x.asman.job.>": b"{}",
            f"{api}.CONSUMER.CREATE.{jobs_stream}": b"{}",
            f"{api}.CONSUMER.DURABLE.CREATE.{jobs_stream}.d": b"{}",
            f"{api}.CONSUMER.CREATE.{waiting}.x.asman.waiting.beta.*.*": b"{}",
            # writing to beta, and the streams' management
            subjects.job_subject("beta", beta.job_id): b"junk",
            f"{api}.STREAM.CREATE.MINE": b"{}",
            f"{api}.STREAM.PURGE.{jobs_stream}": b"",
        }
        denied_subs = (
            ">",
            "asman.>",
            "asman.job.*.*",
            "asman.job.beta.*",
            "asman.waiting.beta.*.*",
            "asman.logs.*.*",
            "_INBOX.>",
            f"{other.inbox_prefix}.>",  # another connection's inbox
            "$JS.EVENT.>",
        )
        await refusals.expect_refused(nc, denied_requests, denied_subs)

        # the inbox is derived from a secret: whoever saw the other connection's inbox in a
        # reply subject and presents it gets an inbox of its own, not that one
        stolen = Capability(("alpha",), other.inbox)
        assert stolen.inbox != other.inbox
        thieves = Refusals()
        thief = await _raw(thieves, public.url, stolen)
        try:
            await thief.subscribe(f"{other.inbox_prefix}.>")
            await thieves.until(lambda: any(other.inbox in v for v in thieves.seen))
        finally:
            await thief.close()

        # what it may do, it may do: alpha's read consumer, created on alpha's filter
        create = f"{api}.CONSUMER.CREATE.{jobs_stream}.mine.asman.job.alpha.*"
        body = {
            "stream_name": jobs_stream,
            "config": {"name": "mine", "ack_policy": "none", "filter_subject": "asman.job.alpha.*"},
        }
        reply = await nc.request(create, json.dumps(body).encode(), timeout=2)
        assert json.loads(reply.data)["config"]["filter_subject"] == "asman.job.alpha.*"
        # and the server itself refuses a payload filter that differs from the subject's
        body["config"] = {"name": "sneaky", "ack_policy": "none", "filter_subject": ">"}
        sneaky = f"{api}.CONSUMER.CREATE.{jobs_stream}.sneaky.asman.job.alpha.*"
        reply = await nc.request(sneaky, json.dumps(body).encode(), timeout=2)
        assert "error" in json.loads(reply.data), reply.data
    finally:
        await nc.close()
        await nc_other.close()
    # beta is as the admin left it
    assert (await jobs.read_job(admin, "beta", beta.job_id)) == beta.state

    # through Asman: naming alpha gets nothing of beta, and no shared object store
    config = LogConfig(servers=(public.url,), queues=("alpha",), request_timeout_s=1.0)
    async with Log(config, PeerKey.generate()) as log:
        for attempt in (
            jobs.read_job(log, "beta", beta.job_id),
            jobs.list_jobs(log, "beta"),
        ):
            with pytest.raises(LogError, match="refused this user's credentials the permission"):
                await attempt
    with pytest.raises(BlobError, match="give an S3 store for blobs"):
        await NoBlobStore().put_bytes(b"x" * 1000)


async def _raw(refusals: Refusals, url: str, capability: Capability) -> NATS:
    """A plain connection presenting ``capability``, its violations recorded."""
    return await refusals.connect(
        url,
        user=capability.user,
        password=capability.password,
        inbox_prefix=capability.inbox_prefix,
    )


@pytest.mark.docker
def test_a_stranger_runs_a_job_with_the_cli_and_nothing_but_the_url(
    public: Public, tmp_path: Path, busybox_image: str
) -> None:
    """`asman worker` and `asman submit --wait` as CLI processes, given only the server's URL
    (no credentials, no confined options, no blob store): the job runs, its output comes
    back, `jobs ls` and `watch --once` show it."""
    cli = Cli(tmp_path / "home", public.url)
    (tmp_path / "home").mkdir()
    cli.start("worker", "alpha", "--data-dir", str(tmp_path / "w"), log="worker.log")
    try:
        run = cli.run(
            "submit", "alpha", busybox_image, "--wait", "-o", str(tmp_path / "out"),
            "--", "sh", "-c", "echo public; echo capability > /outputs/o.txt",
        )  # fmt: skip
        told = run.stderr.decode()
        assert run.returncode == 0, (told, cli.log("worker.log"))
        assert ": success, exit code 0" in told and run.stdout.decode() == "public\n"
        assert (tmp_path / "out" / "o.txt").read_text() == "capability\n"
        listed = cli.run("jobs", "ls", "alpha", "--json")
        assert listed.returncode == 0, listed.stderr.decode()
        assert [j["reason"] for j in json.loads(listed.stdout)] == ["success"]
        watched = cli.run("watch", "alpha", "--once")
        assert watched.returncode == 0, watched.stderr.decode()
        # a command for another queue sees none of alpha's
        other = cli.run("jobs", "ls", "beta", "--json")
        assert other.returncode == 0 and json.loads(other.stdout) == []
    finally:
        cli.stop_all()
    assert cli.procs[0].returncode == 0, cli.log("worker.log")
    assert "did not answer in time" not in cli.log("worker.log")


def test_a_private_queue_on_a_public_server(
    public: Public, tmp_path: Path, busybox_image: str
) -> None:
    """Capabilities and policies together: the owner makes a private queue and trusts one
    worker, all through the CLI given only the URL; a stranger's worker that knows the name
    runs nothing, the trusted one runs the job."""
    homes = {name: tmp_path / name for name in ("owner", "trusted", "stranger")}
    for home in homes.values():
        home.mkdir()
    owner, trusted, stranger = (Cli(home, public.url) for home in homes.values())
    try:
        made = owner.run("queue", "new", "--private", "--json")
        assert made.returncode == 0, made.stderr.decode()
        queue = json.loads(made.stdout)["queue"]
        key = trusted.run("keys", "--create").stdout.decode().strip()
        assert owner.run("queue", "trust", queue, key).returncode == 0
        shown = owner.run("queue", "policy", "show", queue, "--json")
        assert json.loads(shown.stdout)["policy"]["workers"] == sorted(
            [key, json.loads(made.stdout)["policy"]["owner"]]
        )
        stranger.start("worker", queue, "--data-dir", str(tmp_path / "ws"), log="w.log")
        trusted.start("worker", queue, "--data-dir", str(tmp_path / "wt"), log="w.log")
        run = owner.run("submit", queue, busybox_image, "--wait", "--json", "--", "echo", "ok")
        assert run.returncode == 0, (run.stderr.decode(), trusted.log("w.log"))
        job = json.loads(run.stdout)["job_id"]
        state = json.loads(owner.run("jobs", "show", queue, job, "--json").stdout)
        assert state["reason"] == "success" and state["worker"] == key, state
    finally:
        for c in (owner, trusted, stranger):
            c.stop_all()
    assert "trusts only its listed workers" in stranger.log("w.log")
