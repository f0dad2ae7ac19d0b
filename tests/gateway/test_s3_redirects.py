"""With an S3 blob store, bytes never pass through the gateway: presigned redirects.
Real SeaweedFS, nats-server, worker and Docker engine."""

from __future__ import annotations

import hashlib
import io
import os

import aiohttp
import pytest
from gatewaystack import IMAGE, Stack

from asman.peer.s3 import S3Blobs

pytestmark = [pytest.mark.s3, pytest.mark.docker]


async def test_outputs_and_blobs_redirect_to_presigned_urls(
    stack: Stack, busybox_image: str, s3_server: object, s3_bucket: str
) -> None:
    endpoint = s3_server.endpoint  # type: ignore[attr-defined]
    access, secret = s3_server.access_key, s3_server.secret_key  # type: ignore[attr-defined]
    url = f"s3+http://{endpoint}/{s3_bucket}/blobs"
    gw = await stack.gateway(blobs_url=url, s3_access_key=access, s3_secret_key=secret)
    status, info = await gw.json("GET", "/api/v1/info")
    assert info["blobs"] == "s3"
    await stack.worker("s3q", blobs=S3Blobs.from_url(url, access, secret))

    # upload: PUT /f/<sha> answers 302 to a presigned PUT; following it with the body stores it
    data = os.urandom(300_000)
    digest = hashlib.sha256(data).hexdigest()
    async with gw.http.put(f"/f/{digest}", data=b"", allow_redirects=False) as resp:
        assert resp.status == 302
        upload = resp.headers["Location"]
    async with aiohttp.ClientSession() as raw, raw.put(upload, data=io.BytesIO(data)) as resp:
        assert resp.status == 200, await resp.text()
    status, body = await gw.json("GET", f"/f/{digest}/exists")
    assert (status, body["exists"]) == (200, True)
    async with gw.http.put(f"/api/v1/blobs/{digest}", data=b"", allow_redirects=False) as resp:
        assert resp.status == 307

    definition = {
        "image": IMAGE,
        "command": "sh -c 'cp /inputs/in.bin /outputs/out.bin; echo small > /outputs/s.txt'",
        "inputs": {"in.bin": {"type": "url", "value": f"{gw.url}/f/{digest}"}},
    }
    status, job = await gw.json("POST", "/api/v1/queues/s3q/jobs", json={"definition": definition})
    assert status == 201, job
    job = await gw.wait_job("s3q", job["jobId"])
    assert job["reason"] == "success", job
    base = f"/api/v1/queues/s3q/jobs/{job['jobId']}"
    for path in (
        f"{base}/outputs/out.bin",
        f"/q/s3q/j/{job['jobId']}/outputs/out.bin",
        f"/f/{digest}",
    ):
        async with gw.http.get(path, allow_redirects=False) as resp:
            assert resp.status == 302, path
            location = resp.headers["Location"]
            assert location.startswith(f"http://{endpoint}/"), location
        async with gw.http.get(path) as resp:  # following the redirect gives the bytes
            assert resp.status == 200 and await resp.read() == data, path
    # inline outputs are served by the gateway itself
    async with gw.http.get(f"{base}/outputs/s.txt", allow_redirects=False) as resp:
        assert resp.status == 200 and await resp.read() == b"small\n"
    # the input given as a URL is a redirect to that URL
    async with gw.http.get(f"{base}/inputs/in.bin", allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == f"{gw.url}/f/{digest}"
