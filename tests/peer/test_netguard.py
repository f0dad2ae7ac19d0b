"""No server-side request forgery: what a job may make the worker fetch (asman.peer.netguard).

Real HTTP servers on 127.0.0.1 play the worker's own services. Traffic goes to 127.0.0.0/8
only: every other address (private, link-local, multicast…) is tested through the checks that
run before any connection, never by fetching it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from workerstack import IMAGE, Stack, output_bytes, run_job
from yarl import URL

from asman.dev import own_services
from asman.errors import BlobError, BlobTooLarge, ConfigError, InvalidInput, UrlRefused
from asman.log.blobs import BlobStore
from asman.log.definition import DataRef
from asman.peer.inputs import InputFetcher
from asman.peer.netguard import (
    UrlPolicy,
    check_image_reference,
    check_url,
    non_public,
    registry_of,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY = b"the bytes a job asked for\n"


@dataclass
class Server:
    port: int
    seen: list[str] = field(default_factory=list)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@contextlib.asynccontextmanager
async def serving(routes: dict[str, Handler]) -> AsyncIterator[Server]:
    """An HTTP server on 127.0.0.1 (a free port) that records the paths it is asked for."""
    server = Server(0)

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        server.seen.append(request.path_qs)
        return await handler(request)

    app = web.Application(middlewares=[record])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


async def data(request: web.Request) -> web.Response:
    return web.Response(body=BODY)


def redirect_to(location: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        raise web.HTTPFound(location)

    return handler


@dataclass
class Trickle:
    """A server that sends a few bytes every 20 ms, forever: ``started`` once bytes have
    gone out, ``gone`` when the client has hung up."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            for sent in range(1, 100_000):
                await resp.write(b"x" * 16)
                if sent == 3:
                    self.started.set()
                await asyncio.sleep(0.02)
        except ConnectionError:
            pass
        finally:
            self.gone.set()
        return resp


def fetcher(tmp_path: Path, *allow: str, url_timeout_s: float = 30.0) -> InputFetcher:
    # URL inputs only: the blob store is never asked
    return InputFetcher(
        cast(BlobStore, None),
        cache_dir=tmp_path / "cache",
        url_limit=1024 * 1024,
        url_timeout_s=url_timeout_s,
        policy=UrlPolicy.parse(allow),
    )


def left_in(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# -- the address rules (no traffic) -------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.0.9", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("100.64.0.1", "shared (CGNAT)"),
        ("fd00::1", "unique-local"),
        ("fec0::1", "site-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "special-purpose"),
        ("2001::1", "special-purpose"),  # Teredo
        ("64:ff9b:1::a", "NAT64 local-use"),
        ("2002:7f00:1::", "loopback (inside 2002:7f00:1::)"),  # 6to4 of 127.0.0.1
        ("64:ff9b::a01:203", "private (inside 64:ff9b::a01:203)"),  # NAT64 of 10.1.2.3
        ("::a9fe:a9fe", "link-local (inside ::a9fe:a9fe)"),  # IPv4-compatible 169.254.169.254
    ],
)
def test_non_public_addresses_are_named(address: str, why: str) -> None:
    assert non_public(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::"],
)
def test_public_addresses_pass(address: str) -> None:
    assert non_public(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/x",
        "https://192.168.1.1:8443/x",
        "http://[fd00::1]/x",
        "http://224.0.0.1/x",
        "http://0.0.0.0:8222/jsz",
        "http://[::ffff:169.254.169.254]/x",
        "http://[fe80::1%25eth0]/x",
    ],
)
def test_literal_addresses_are_refused_before_any_connection(url: str) -> None:
    # check_url is what runs before a request is sent; it does no I/O at all
    with pytest.raises(UrlRefused, match="start the worker with `asman worker --allow-url"):
        check_url(URL(url), UrlPolicy(), "input")


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://example.org/x", "gopher://127.0.0.1/", "http:///x"]
)
def test_only_http_and_https_with_a_host(url: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(URL(url), UrlPolicy(), "input")


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1", "017700000001"])
def test_legacy_ipv4_forms_are_refused(host: str) -> None:
    with pytest.raises(UrlRefused, match="legacy form"):
        check_url(URL(f"http://{host}/x"), UrlPolicy(), "input")


def test_policy_parses_names_addresses_networks_and_ports() -> None:
    policy = UrlPolicy.parse(
        ["10.0.0.0/8", "files.Example.org.", "127.0.0.1:8080,[::1]:9000", "fd00::/8 host:1"]
    )
    assert policy.allows_address(ipaddress.ip_address("10.9.8.7"), 80)
    assert policy.allows_address(ipaddress.ip_address("::ffff:10.9.8.7"), 80)
    assert policy.allows_address(ipaddress.ip_address("127.0.0.1"), 8080)
    assert not policy.allows_address(ipaddress.ip_address("127.0.0.1"), 8081)
    assert policy.allows_address(ipaddress.ip_address("::1"), 9000)
    assert not policy.allows_address(ipaddress.ip_address("::1"), 80)
    assert policy.allows_address(ipaddress.ip_address("fd12::5"), 443)
    assert not policy.allows_address(ipaddress.ip_address("192.168.0.1"), 80)
    assert policy.allows_name("FILES.example.org", 443)
    assert policy.allows_name("host", 1) and not policy.allows_name("host", 2)
    # an allowed address is not checked further; others still are
    policy.check_address("10.1.1.1", 80, "10.1.1.1")
    with pytest.raises(UrlRefused, match=r"192\.168\.0\.1:80 is a private address"):
        policy.check_address("192.168.0.1", 80, "192.168.0.1")


@pytest.mark.parametrize(
    "entry",
    ["http://x", "10.0.0.5/8", "10.0.0.0/33", "[::1", "[::1]x", "host:0", "host:http", "a b!c"],
)
def test_bad_allow_url_entries_say_what_to_write(entry: str) -> None:
    with pytest.raises(ConfigError, match="--allow-url") as info:
        UrlPolicy.parse([entry])
    assert isinstance(info.value, InvalidInput)
    assert "\n" not in str(info.value)


def test_asman_dev_allows_its_own_ports_only() -> None:
    policy = UrlPolicy.parse(own_services((4222, 8080)))
    policy.check_address("127.0.0.1", 8080, "127.0.0.1")
    policy.check_address("127.0.0.1", 4222, "127.0.0.1")
    assert policy.allows_name("localhost", 8080)
    with pytest.raises(UrlRefused):
        policy.check_address("127.0.0.1", 8222, "127.0.0.1")  # e.g. a NATS monitor port


# -- image references -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("alpine:3.19", None),
        ("alpine", None),
        ("asman/busybox:local", None),
        ("library/alpine@sha256:" + "0" * 64, None),
        ("registry.example.com/x", ("registry.example.com", 443)),
        ("127.0.0.1:5000/x/y:tag", ("127.0.0.1", 5000)),
        ("localhost/a", ("localhost", 443)),
        ("localhost:5000/a", ("localhost", 5000)),
        ("[::1]:5000/a:1", ("::1", 5000)),
        ("Upper/x", ("Upper", 443)),
    ],
)
def test_registry_of_follows_dockers_rule(image: str, registry: tuple[str, int] | None) -> None:
    assert registry_of(image) == registry


@pytest.mark.parametrize(
    "image",
    ["127.0.0.1:5000/x/y:tag", "localhost:5000/a", "[::1]:5000/a", "10.0.0.7/team/app:1"],
)
async def test_images_from_local_or_private_registries_are_refused(image: str) -> None:
    # literals are judged as they are; "localhost" resolves from /etc/hosts (no DNS traffic)
    with pytest.raises(UrlRefused, match=r"image .*--allow-url"):
        await check_image_reference(image, UrlPolicy())


async def test_hub_and_local_images_pass_and_registries_can_be_allowed() -> None:
    for image in ("asman/busybox:local", "alpine:3.19", "python"):
        await check_image_reference(image, UrlPolicy())
    await check_image_reference("127.0.0.1:5000/x/y:tag", UrlPolicy.parse(["127.0.0.1:5000"]))
    await check_image_reference("localhost:5000/a", UrlPolicy.parse(["localhost"]))
    # an allowed name is not resolved at all
    await check_image_reference("registry.example.com/x", UrlPolicy.parse(["registry.example.com"]))
    with pytest.raises(UrlRefused):
        await check_image_reference("127.0.0.1:5001/x", UrlPolicy.parse(["127.0.0.1:5000"]))


# -- fetching from real servers on loopback -------------------------------------------------


async def test_loopback_is_refused_by_default_and_allowed_by_the_operator(tmp_path: Path) -> None:
    async with serving({"/data": data}) as server:
        url = server.url("/data")
        with pytest.raises(UrlRefused, match=r"127\.0\.0\.1:\d+ is a loopback address") as info:
            await fetcher(tmp_path).fetch(DataRef("url", url))
        assert f"--allow-url 127.0.0.1:{server.port}`" in str(info.value)
        assert server.seen == []  # refused before connecting
        with pytest.raises(UrlRefused):
            await fetcher(tmp_path, f"127.0.0.1:{server.port + 1}").fetch(DataRef("url", url))
        assert server.seen == []
        assert left_in(tmp_path / "cache") == []

        path = await fetcher(tmp_path, "127.0.0.1").fetch(DataRef("url", url))
        assert path.read_bytes() == BODY
        assert path.name == hashlib.sha256(BODY).hexdigest()
        path = await fetcher(tmp_path / "b", f"127.0.0.1:{server.port}").fetch(DataRef("url", url))
        assert path.read_bytes() == BODY
        assert server.seen == ["/data", "/data"]


async def test_a_name_that_resolves_to_loopback_is_refused(tmp_path: Path) -> None:
    async with serving({"/data": data}) as server:
        url = server.url("/data", host="localhost")
        with pytest.raises(UrlRefused, match=r"localhost:\d+ resolves to 127\.0\.0\.1"):
            await fetcher(tmp_path).fetch(DataRef("url", url))
        # allowing the address allows a name that resolves to it, and so does the name
        assert (await fetcher(tmp_path, "127.0.0.0/8").fetch(DataRef("url", url))).exists()
        assert (await fetcher(tmp_path / "b", "localhost").fetch(DataRef("url", url))).exists()
        assert server.seen == ["/data", "/data"]


@pytest.mark.parametrize("host", ["[::1]", "[::ffff:127.0.0.1]", "[0:0:0:0:0:ffff:7f00:1]"])
async def test_ipv6_loopback_forms_are_refused(tmp_path: Path, host: str) -> None:
    async with serving({"/data": data}) as server:
        with pytest.raises(UrlRefused, match="loopback"):
            await fetcher(tmp_path).fetch(DataRef("url", server.url("/data", host=host)))
        assert server.seen == []


async def test_a_redirect_to_loopback_is_refused_at_the_redirect(tmp_path: Path) -> None:
    async with serving({"/data": data}) as inner:
        target = inner.url("/data")
        async with serving(
            {
                "/to-inner": redirect_to(target + "?sig=secret"),
                "/to-inner-by-name": redirect_to(inner.url("/data", host="localhost")),
                "/to-file": redirect_to("file:///etc/passwd"),
                "/relative": redirect_to("/data?via=relative"),
                "/data": data,
                "/loop": redirect_to("/loop"),
            }
        ) as outer:
            # the outer server plays a public host: allowed; the inner one is not
            f = fetcher(tmp_path, f"127.0.0.1:{outer.port}")
            started = time.monotonic()
            with pytest.raises(
                UrlRefused, match=rf"redirected to {re.escape(target)}\).*loopback"
            ) as info:
                await f.fetch(DataRef("url", outer.url("/to-inner")))
            assert "secret" not in str(info.value)  # a Location's query is not repeated
            with pytest.raises(UrlRefused, match=r"resolves to 127\.0\.0\.1"):
                await f.fetch(DataRef("url", outer.url("/to-inner-by-name")))
            with pytest.raises(UrlRefused, match="only http and https"):
                await f.fetch(DataRef("url", outer.url("/to-file")))
            with pytest.raises(UrlRefused, match="more than 5 redirects"):
                await f.fetch(DataRef("url", outer.url("/loop")))
            assert time.monotonic() - started < 2.0  # refusals are not retried
            assert inner.seen == []
            assert outer.seen == ["/to-inner", "/to-inner-by-name", "/to-file"] + ["/loop"] * 6

            path = await f.fetch(DataRef("url", outer.url("/relative")))
            assert path.read_bytes() == BODY
            assert outer.seen[-2:] == ["/relative", "/data?via=relative"]
        assert [p for p in left_in(tmp_path / "cache") if p.startswith(".")] == []


async def test_build_contexts_go_through_the_same_policy(tmp_path: Path) -> None:
    async with serving({"/ctx.tar": data}) as server:
        url = server.url("/ctx.tar")
        with pytest.raises(UrlRefused):
            await fetcher(tmp_path).fetch_context(url, tmp_path / "ctx.tar")
        dest = await fetcher(tmp_path, "127.0.0.1").fetch_context(url, tmp_path / "ctx.tar")
        assert dest.read_bytes() == BODY
        assert server.seen == ["/ctx.tar"]


async def test_size_limit_and_digest_still_hold(tmp_path: Path) -> None:
    async def big(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * (1024 * 1024 + 1))

    async with serving({"/big": big, "/data": data}) as server:
        f = fetcher(tmp_path, "127.0.0.1")
        with pytest.raises(BlobTooLarge):
            await f.fetch(DataRef("url", server.url("/big")))
        wrong = "0" * 64
        with pytest.raises(BlobError, match="does not match its sha256"):
            await f.fetch(DataRef("url", server.url("/data"), hash=wrong))
        assert left_in(tmp_path / "cache") == []


# -- bounded in time, cancellable -------------------------------------------------------------


async def test_a_download_ends_at_the_jobs_deadline(tmp_path: Path) -> None:
    trickle = Trickle()
    async with serving({"/slow": trickle.handler}) as server:
        f = fetcher(tmp_path, "127.0.0.1")
        started = time.monotonic()
        with pytest.raises(BlobError, match="not downloaded in time: it ran into the job's"):
            await f.fetch(DataRef("url", server.url("/slow")), deadline=started + 0.5)
        assert time.monotonic() - started < 3.0
        await asyncio.wait_for(trickle.gone.wait(), 5)  # the connection was dropped
        assert left_in(tmp_path / "cache") == []


async def test_a_download_ends_at_the_workers_limit(tmp_path: Path) -> None:
    trickle = Trickle()
    async with serving({"/slow": trickle.handler}) as server:
        f = fetcher(tmp_path, "127.0.0.1", url_timeout_s=0.5)
        with pytest.raises(BlobError, match=r"worker's download limit of 0\.5s"):
            await f.fetch(DataRef("url", server.url("/slow")), deadline=time.monotonic() + 60)
        assert left_in(tmp_path / "cache") == []
        # a deadline already passed fails at once, without a request
        with pytest.raises(BlobError, match="job's time limit"):
            await f.fetch(DataRef("url", server.url("/slow")), deadline=time.monotonic() - 1)
        assert server.seen == ["/slow"]


async def test_a_download_stops_when_cancelled_mid_transfer(tmp_path: Path) -> None:
    trickle = Trickle()
    async with serving({"/slow": trickle.handler}) as server:
        f = fetcher(tmp_path, "127.0.0.1")
        task = asyncio.create_task(f.fetch(DataRef("url", server.url("/slow"))))
        await asyncio.wait_for(trickle.started.wait(), 10)
        assert not task.done()
        task.cancel()
        started = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1.0)
        assert time.monotonic() - started < 1.0
        await asyncio.wait_for(trickle.gone.wait(), 5)  # the server saw the client hang up
        assert left_in(tmp_path / "cache") == []


# -- through a worker (real nats-server and Docker engine) -----------------------------------


@pytest.mark.docker
async def test_a_worker_refuses_local_urls_and_registries_unless_allowed(stack: Stack) -> None:
    client = await stack.log()
    blobs = await stack.blobs(client)
    async with serving({"/data": data}) as server:
        await stack.start_worker("guarded")
        await stack.start_worker("allowing", allow_urls=(f"127.0.0.1:{server.port}",))
        job = {
            "image": IMAGE,
            "command": "cp /inputs/f /outputs/f",
            "inputs": {"f": {"type": "url", "value": server.url("/data")}},
        }
        state = await run_job(client, "guarded", job)
        assert state.reason == "error" and state.result is not None
        assert "is a loopback address: refused" in state.result.message
        assert server.seen == []

        state = await run_job(client, "allowing", job)
        assert state.reason == "success", state.result
        assert await output_bytes(blobs, state) == {"f": BODY}
        assert server.seen == ["/data"]

        for queue in ("guarded", "allowing"):
            state = await run_job(client, queue, {"image": "127.0.0.1:5000/x/y:tag"})
            assert state.reason == "error" and state.result is not None
            assert "--allow-url 127.0.0.1:5000" in state.result.message
