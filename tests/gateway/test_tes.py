"""GA4GH TES 1.1 on a queue, end to end: the real ``py-tes`` client against a real gateway,
a real worker, the Docker engine and a real S3 server (SeaweedFS).

Tasks are waited for on the job's own event stream (a task id is its job id), never by
polling with sleeps; py-tes does everything else: create, get with each view, list, cancel.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import tes
from aiohttp import web
from gatewaystack import IMAGE, Gateway, Stack
from minio import Minio
from s3server import SeaweedS3

from asman.log.server import free_port
from asman.peer.s3 import S3Blobs

pytestmark = [pytest.mark.docker, pytest.mark.s3]


@dataclass
class Tes:
    gateway: Gateway
    queue: str
    client: tes.HTTPClient
    s3: Minio
    bucket: str

    @property
    def base(self) -> str:
        return f"/q/{self.queue}/ga4gh/tes/v1"

    async def create(self, task: tes.Task) -> str:
        created = await asyncio.to_thread(self.client.create_task, task)
        return str(getattr(created, "id", created))  # py-tes 1.1.4 returns the id itself

    async def get(self, task_id: str, view: str) -> tes.Task:
        return await asyncio.to_thread(self.client.get_task, task_id, view)

    async def finished(self, task_id: str) -> tes.Task:
        await self.gateway.wait_job(self.queue, task_id)
        return await self.get(task_id, "FULL")

    def put(self, name: str, data: bytes) -> None:
        self.s3.put_object(self.bucket, name, io.BytesIO(data), len(data))

    def read(self, name: str) -> bytes:
        resp = self.s3.get_object(self.bucket, name)
        try:
            return bytes(resp.read())
        finally:
            resp.close()
            resp.release_conn()


def s3_store(server: SeaweedS3, bucket: str) -> S3Blobs:
    return S3Blobs(
        server.endpoint, server.access_key, server.secret_key, bucket, secure=False, prefix="blobs"
    )


@pytest.fixture
async def tes_stack(
    stack: Stack, s3_server: SeaweedS3, s3_bucket: str, busybox_image: str
) -> AsyncIterator[Tes]:
    """A gateway and a worker that share the S3 bucket as their blob store (the worker's
    S3 settings are what reads s3:// inputs and writes s3:// outputs)."""
    gateway = await stack.gateway(
        blobs_url=f"s3+http://{s3_server.endpoint}/{s3_bucket}/blobs",
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
    )
    queue = "tesq"
    yield Tes(
        gateway,
        queue,
        tes.HTTPClient(url=f"{gateway.url}/q/{queue}", timeout=30),
        s3_server.client(),
        s3_bucket,
    )


async def worker(t: Tes, stack: Stack, server: SeaweedS3) -> None:
    await stack.worker(t.queue, blobs=s3_store(server, t.bucket))


@pytest.fixture
async def http_files() -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1 serving /hello.txt (the worker allows 127.0.0.1)."""
    app = web.Application()

    async def hello(_: web.Request) -> web.Response:
        return web.Response(body=b"from http\n")

    app.router.add_get("/hello.txt", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_service_info_says_tes_1_1_and_its_storage(tes_stack: Tes) -> None:
    info = await asyncio.to_thread(tes_stack.client.get_service_info)
    assert info.type == {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"}
    assert "s3://" in info.storage and "https://" in info.storage


async def test_two_executors_share_a_volume_with_inputs_from_content_s3_and_http(
    tes_stack: Tes, stack: Stack, s3_server: SeaweedS3, http_files: str
) -> None:
    t = tes_stack
    t.put("in/from_s3.txt", b"from s3\n")
    t.put("in/dir/a.txt", b"dir a\n")
    t.put("in/dir/sub/b.txt", b"dir b\n")
    await worker(t, stack, s3_server)
    task = tes.Task(
        name="share-volume",
        description="two executors and a volume",
        tags={"project": "tes-e2e"},
        resources=tes.Resources(cpu_cores=1, ram_gb=0.25, disk_gb=1.0, preemptible=True),
        volumes=["/data/work"],
        inputs=[
            tes.Input(path="/data/in/content.txt", content="inline\n"),
            tes.Input(path="/data/in/s3.txt", url=f"s3://{t.bucket}/in/from_s3.txt"),
            tes.Input(path="/inputs/http.txt", url=f"{http_files}/hello.txt"),
            tes.Input(path="/data/dir", url=f"s3://{t.bucket}/in/dir", type="DIRECTORY"),
        ],
        outputs=[
            tes.Output(path="/data/out/all.txt", url=f"s3://{t.bucket}/results/all.txt"),
            tes.Output(path="/data/out", url=f"s3://{t.bucket}/results/dir", type="DIRECTORY"),
        ],
        executors=[
            tes.Executor(
                image=IMAGE,
                command=[
                    "sh",
                    "-c",
                    "cat /data/in/content.txt /data/in/s3.txt /inputs/http.txt "
                    "/data/dir/a.txt /data/dir/sub/b.txt > /data/work/joined; echo first",
                ],
                stdout="/data/out/first.log",
            ),
            tes.Executor(
                image=IMAGE,
                command=["sh", "-c", "cp /data/work/joined /data/out/all.txt; echo second >&2"],
                env={"WHO": "second"},
            ),
        ],
    )
    task_id = await t.create(task)
    done = await t.finished(task_id)
    assert done.state == "COMPLETE", done
    joined = b"inline\nfrom s3\nfrom http\ndir a\ndir b\n"
    assert t.read("results/all.txt") == joined
    assert t.read("results/dir/all.txt") == joined
    assert t.read("results/dir/first.log") == b"first\n"
    log = done.logs[0]
    assert [e.exit_code for e in log.logs] == [0, 0]
    assert log.logs[0].stdout == "first\n" and log.logs[1].stderr == "second\n"
    assert log.start_time is not None and log.end_time >= log.start_time
    sizes = {(o.path, o.url): o.size_bytes for o in log.outputs}
    assert sizes[("/data/out/all.txt", f"s3://{t.bucket}/results/all.txt")] == len(joined)
    assert sizes[("/data/out/first.log", f"s3://{t.bucket}/results/dir/first.log")] == 6
    assert done.tags == {"project": "tes-e2e"} and done.name == "share-volume"
    assert done.volumes == ["/data/work"]
    assert done.resources.ram_gb == 0.25 and done.resources.preemptible is True
    assert next(i for i in done.inputs if i.path == "/data/in/content.txt").content == "inline\n"

    # the views: MINIMAL is id and state; BASIC leaves out contents, output tails, system logs
    minimal = await t.get(task_id, "MINIMAL")
    assert (minimal.id, minimal.state, minimal.executors, minimal.logs) == (
        task_id,
        "COMPLETE",
        None,
        None,
    )
    basic = await t.get(task_id, "BASIC")
    assert basic.executors[0].command[0] == "sh" and basic.executors[1].env == {"WHO": "second"}
    assert all(i.content is None for i in basic.inputs)
    assert basic.logs[0].logs[0].stdout is None and basic.logs[0].system_logs is None
    assert basic.logs[0].outputs

    # the same task is the same job: the same id, its result cached
    assert await t.create(task) == task_id
    assert (await t.get(task_id, "MINIMAL")).state == "COMPLETE"


async def test_a_failing_executor_ends_the_task_and_ignore_error_goes_on(
    tes_stack: Tes, stack: Stack, s3_server: SeaweedS3
) -> None:
    t = tes_stack
    await worker(t, stack, s3_server)
    steps = [
        tes.Executor(image=IMAGE, command=["sh", "-c", "echo one"]),
        tes.Executor(image=IMAGE, command=["sh", "-c", "echo broken >&2; exit 3"]),
        tes.Executor(image=IMAGE, command=["sh", "-c", "echo never"]),
    ]
    failing = await t.create(tes.Task(name="fails", executors=steps))
    done = await t.finished(failing)
    assert done.state == "EXECUTOR_ERROR"
    assert [e.exit_code for e in done.logs[0].logs] == [0, 3]  # the third never ran
    assert done.logs[0].logs[1].stderr == "broken\n"
    assert any("executor 1" in line and "3" in line for line in done.logs[0].system_logs)

    steps[1] = tes.Executor(image=IMAGE, command=["sh", "-c", "exit 3"], ignore_error=True)
    going_on = await t.create(tes.Task(name="goes-on", executors=steps))
    done = await t.finished(going_on)
    assert done.state == "COMPLETE"
    assert [e.exit_code for e in done.logs[0].logs] == [0, 3, 0]
    assert done.logs[0].logs[2].stdout == "never\n"


async def test_an_input_under_tmp_is_placed_there(
    tes_stack: Tes, stack: Stack, s3_server: SeaweedS3
) -> None:
    """Snakemake's TES executor (and Funnel's examples) put the job script at
    /tmp/run_snakemake.sh and run it with workdir /tmp: the file is bound read-only over the
    container's own /tmp, which stays writable around it."""
    t = tes_stack
    await worker(t, stack, s3_server)
    task_id = await t.create(
        tes.Task(
            inputs=[tes.Input(path="/tmp/run.sh", content="echo ran in $(pwd) > made.txt\n")],
            executors=[
                tes.Executor(
                    image=IMAGE,
                    command=["sh", "-c", "sh /tmp/run.sh && cat made.txt && ls /tmp"],
                    workdir="/tmp",
                )
            ],
        )
    )
    done = await t.finished(task_id)
    assert done.state == "COMPLETE", done.logs[0].system_logs
    assert done.logs[0].logs[0].stdout == "ran in /tmp\nmade.txt\nrun.sh\n"
    assert [i.path for i in done.inputs] == ["/tmp/run.sh"]


async def test_cancel_a_running_task(tes_stack: Tes, stack: Stack, s3_server: SeaweedS3) -> None:
    t = tes_stack
    await worker(t, stack, s3_server)
    task_id = await t.create(
        tes.Task(executors=[tes.Executor(image=IMAGE, command=["sleep", "60"])])
    )
    await t.gateway.wait_state(t.queue, task_id, lambda v: v.get("startedMs") is not None)
    assert (await t.get(task_id, "MINIMAL")).state == "RUNNING"
    await asyncio.to_thread(t.client.cancel_task, task_id)
    assert (await t.get(task_id, "MINIMAL")).state in ("CANCELING", "CANCELED")
    done = await t.finished(task_id)
    assert done.state == "CANCELED"


async def test_list_with_each_filter_and_pages(tes_stack: Tes) -> None:
    """No worker: the tasks stay QUEUED, which is all listing needs."""
    t = tes_stack
    ids = {}
    for name, tags in (
        ("align-1", {"run": "a", "kind": "align"}),
        ("align-2", {"run": "b", "kind": "align"}),
        ("call-1", {"run": "a"}),
    ):
        ids[name] = await t.create(
            tes.Task(
                name=name,
                tags=tags,
                executors=[tes.Executor(image=IMAGE, command=["echo", name])],
            )
        )

    async def listed(**params: Any) -> tuple[list[str], dict[str, Any]]:
        status, body = await t.gateway.json("GET", f"{t.base}/tasks", params=params)
        assert status == 200, body
        return [task["id"] for task in body["tasks"]], body

    everything, body = await listed()
    assert set(everything) == set(ids.values())
    assert body["tasks"][0] == {"id": everything[0], "state": "QUEUED"}  # MINIMAL by default
    assert (await listed(name_prefix="align"))[0] == [ids["align-2"], ids["align-1"]]
    assert set((await listed(tag_key="run", tag_value="a"))[0]) == {ids["align-1"], ids["call-1"]}
    assert set((await listed(tag_key="kind"))[0]) == {ids["align-1"], ids["align-2"]}
    assert (await listed(state="QUEUED"))[0] == everything
    assert (await listed(state="COMPLETE"))[0] == []
    _, full = await listed(view="FULL", name_prefix="call")
    assert full["tasks"][0]["executors"][0]["command"] == ["echo", "call-1"]

    # pages, through py-tes
    pages: list[str] = []
    token = None
    while True:
        page = await asyncio.to_thread(t.client.list_tasks, "BASIC", 2, token)
        pages += [task.id for task in page.tasks]
        assert all(task.name for task in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert pages == everything


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"inputs": [{"path": "/proc/self/x", "content": "x"}]}, "/proc"),
        ({"inputs": [{"path": "/data/../etc/x", "content": "x"}]}, "'..'"),
        ({"inputs": [{"path": "/data/x", "url": "ftp://h/x"}]}, "http(s)://"),
        ({"outputs": [{"path": "/sys/x", "url": "s3://b/x"}]}, "/sys"),
        ({"outputs": [{"path": "/data/x", "url": "gs://b/x"}]}, "s3://"),
        ({"volumes": ["/dev/shm"]}, "/dev"),
        ({"inputs": [{"path": "data/x", "content": "x"}]}, "absolute"),
        (
            {"inputs": [{"path": "/data/x", "content": "x"}, {"path": "/data/x", "content": "y"}]},
            "twice",
        ),
        ({"outputs": [{"path": "/out.txt", "url": "s3://b/x"}]}, "folder such as /data"),
        ({"executors": [{"image": IMAGE, "command": ["true"], "stdout": "/etc/x"}]}, "share"),
        ({"executors": []}, "at least one executor"),
        ({"priority": 3}, "unknown fields"),
        (
            {"resources": {"backend_parameters": {"x": "y"}, "backend_parameters_strict": True}},
            "backend_parameters",
        ),
    ],
)
async def test_a_task_asman_cannot_run_gets_400_saying_why(
    tes_stack: Tes, change: dict[str, Any], words: str
) -> None:
    task = {"executors": [{"image": IMAGE, "command": ["true"]}], **change}
    status, body = await tes_stack.gateway.json(
        "POST", f"{tes_stack.base}/tasks", data=json.dumps(task)
    )
    assert status == 400, body
    assert words in body["error"] and "\n" not in body["error"], body


async def test_unknown_tasks_and_bad_views_are_client_errors(tes_stack: Tes) -> None:
    g, base = tes_stack.gateway, tes_stack.base
    status, _ = await g.json("GET", f"{base}/tasks/{'0' * 64}")
    assert status == 404
    status, body = await g.json("GET", f"{base}/tasks?view=EVERYTHING")
    assert status == 400 and "MINIMAL" in body["error"]
    status, body = await g.json("GET", f"{base}/tasks?page_token=nonsense")
    assert status == 400 and "page_token" in body["error"]
    status, _ = await g.json("POST", f"{base}/tasks/{'0' * 64}:cancel")
    assert status == 404


async def test_the_guide_s_example_runs(tes_stack: Tes, stack: Stack, s3_server: SeaweedS3) -> None:
    """docs/examples/tes_two_steps.py, the guide's copy-paste example, as a user runs it."""
    import runpy
    from pathlib import Path

    await worker(tes_stack, stack, s3_server)
    example = Path(__file__).parents[2] / "docs" / "examples" / "tes_two_steps.py"
    run = runpy.run_path(str(example))["run"]
    done = await asyncio.to_thread(run, f"{tes_stack.gateway.url}/q/{tes_stack.queue}", IMAGE)
    assert done.state == "COMPLETE"
    assert done.logs[0].logs[1].stdout == "hello\nAsman\n"
    status, job = await tes_stack.gateway.json(
        "GET", f"/api/v1/queues/{tes_stack.queue}/jobs/{done.id}/outputs/hello.txt"
    )
    assert (status, job) == (200, "hello\nAsman\n")
