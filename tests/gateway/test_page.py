"""The page in a real headless Chromium (Debian's, driven by Playwright; ENVIRONMENT.md §5)
against a real gateway, nats-server, worker and Docker engine. Screenshots of each step go to
``test-artifacts/``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from gatewaystack import IMAGE, Gateway, Stack
from requiring import require

from asman.log import jobs, subjects
from asman.log.definition import job_id
from asman.peer.links import job_link

pytestmark = [pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_MS = 90_000


@pytest.fixture
def chromium() -> str:
    require(os.path.exists(CHROMIUM), f"Chromium ({CHROMIUM}; apt-get install chromium)")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(
        viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    pg = await context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        await context.close()
    assert errors == [], errors


async def shot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"gateway-page-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


@pytest.mark.docker
async def test_a_link_opens_runs_streams_logs_and_downloads_outputs(
    stack: Stack, busybox_image: str, page: Any
) -> None:
    gw = await stack.gateway()
    definition = {
        "image": IMAGE,
        "command": "sh -c 'for i in 1 2 3; do echo step $i; sleep 1; done; echo warn >&2; "
        "cat /inputs/greeting.txt > /outputs/result.txt; echo -n xyz >> /outputs/result.txt'",
        "configFiles": {"greeting.txt": {"type": "utf8", "value": "hello from the link\n"}},
    }
    link = job_link(gw.url, definition, queue="browser")
    expected_id = job_id(definition)

    # 1. the link opens: the editor shows the job, the id is the same as the CLI's
    await page.goto(link)
    await page.wait_for_function(
        "id => document.getElementById('job-id').textContent === id", arg=expected_id
    )
    assert json.loads(await page.input_value("#definition")) == {
        k: v for k, v in definition.items() if k != "configFiles"
    }
    assert await page.input_value("#queue") == "browser"
    assert await page.input_value(".file textarea") == "hello from the link\n"
    await page.wait_for_selector("#workers-note:has-text('no worker online')")
    await shot(page, "1-opened")

    # 2. Run with no worker online: the job waits, and the page says why
    await page.click("#run")
    await page.wait_for_selector("#waiting:has-text('no worker is online')")
    assert await page.text_content("#state") == "queued"
    await shot(page, "2-waiting")

    # 3. a worker joins: the logs stream in and the job finishes
    await stack.worker("browser")
    await page.wait_for_selector("#logs:has-text('step 1')")
    await shot(page, "3-running")  # usually mid-run (the job sleeps between steps)
    await page.wait_for_selector("#state[data-state='success']")
    await page.wait_for_selector("#workers-note:has-text('1 worker online')")
    logs = await page.text_content("#logs")
    assert logs is not None and "step 1\nstep 2\nstep 3\n" in logs and "warn\n" in logs
    assert await page.text_content("#exit-code") == "0"
    assert (await page.text_content("#duration") or "").endswith("s")
    assert await page.is_hidden("#waiting")
    await shot(page, "4-finished")

    # 4. the output link downloads the right bytes
    link_el = page.locator("#outputs a[data-path='result.txt']")
    async with page.expect_download() as info:
        await link_el.click()
    download = await info.value
    saved = Path(await download.path())
    assert await asyncio.to_thread(saved.read_bytes) == b"hello from the link\nxyz"
    assert download.suggested_filename == "result.txt"

    # 5. reloading the link shows the finished job again (replayed from the log)
    await page.reload()
    await page.wait_for_selector("#state[data-state='success']")
    await page.wait_for_selector("#logs:has-text('step 3')")
    await shot(page, "5-reopened")


async def test_a_compute_queues_link_opens_with_the_same_job(gateway: Gateway, page: Any) -> None:
    # reference/compute-queues.md §2, the worked example, with its queue
    url = (
        f"{gateway.url}/#?ignoreQueueOverride=true&job="
        "JTdCJTIyY29tbWFuZCUyMiUzQSUyMmVjaG8lMjAlNUMlMjJoZWxsbyUyMHdvcmxkJTVDJTIyJTIy"
        "JTJDJTIyaW1hZ2UlMjIlM0ElMjJhbHBpbmUlM0EzLjE5LjElMjIlN0Q%3D&queue=public1"
    )
    await page.goto(url)
    expected = "9a684c59f4270fa102f102d2aafe92d5e78ad285116f02d845e5dabbfb0ba873"
    await page.wait_for_function(
        "id => document.getElementById('job-id').textContent === id", arg=expected
    )
    assert json.loads(await page.input_value("#definition")) == {
        "command": 'echo "hello world"',
        "image": "alpine:3.19.1",
    }
    assert await page.input_value("#queue") == "public1"
    assert not await page.is_disabled("#run")
    # the page keeps the link as it found it: same job parameter, same queue
    assert page.url == url
    await shot(page, "compute-queues-link")


async def test_editing_keeps_the_hash_in_sync(gateway: Gateway, page: Any) -> None:
    from asman.peer.links import parse_link

    await page.goto(job_link(gateway.url, {"image": IMAGE, "command": "echo a"}, queue="edit"))
    await page.wait_for_selector("#validation:has-text('valid')")
    new = {"image": IMAGE, "command": "echo b", "env": {"X": "1"}}
    await page.fill("#definition", json.dumps(new))
    await page.wait_for_function(
        "id => document.getElementById('job-id').textContent === id", arg=job_id(new)
    )
    await page.fill("#queue", "other-queue")
    await page.wait_for_function("() => location.hash.includes('queue=other-queue')")
    definition, queue = parse_link(page.url)
    assert (definition, queue) == (new, "other-queue")
    # an invalid definition says what is wrong and disables Run
    await page.fill("#definition", json.dumps({"command": "no image"}))
    await page.wait_for_selector("#validation.bad:has-text('image')")
    assert await page.is_disabled("#run")


async def test_the_editor_says_which_keys_the_schema_does_not_know(
    gateway: Gateway, page: Any
) -> None:
    """A misspelt key is carried and ignored (compute-queues' rule): the page, reading the
    definition's JSON Schema, says so before Run instead of running without it."""
    await page.goto(job_link(gateway.url, {"image": IMAGE, "command": "echo a"}, queue="keys"))
    await page.wait_for_selector("#validation:has-text('valid')")
    await page.fill("#definition", json.dumps({"image": IMAGE, "comand": "echo b", "envv": {}}))
    await page.wait_for_selector("#validation:has-text('ignored')")
    text = await page.text_content("#validation") or ""
    assert "comand" in text and "envv" in text and "valid" in text, text
    assert not await page.is_disabled("#run")  # still a valid job: a note, not an error
    await shot(page, "unknown-keys")
    await page.fill("#definition", json.dumps({"image": IMAGE, "command": "echo b"}))
    await page.wait_for_function(
        "() => !document.getElementById('validation').textContent.includes('ignored')"
    )


async def test_the_short_link_form(gateway: Gateway, page: Any) -> None:
    definition = {"image": IMAGE, "command": "echo short"}
    status, body = await gateway.json("POST", "/q/short", json={"definition": definition})
    assert status == 200
    await page.goto(f"{gateway.url}/j/{body['jobId']}#?queue=short")
    await page.wait_for_function(
        "id => document.getElementById('job-id').textContent === id", arg=body["jobId"]
    )
    assert json.loads(await page.input_value("#definition")) == definition
    assert "#?job=" in page.url and page.url.startswith(f"{gateway.url}/#?")
    await page.wait_for_selector("#state[data-state='queued']")


async def test_a_short_link_to_a_job_with_inputs_opens_that_job(
    gateway: Gateway, page: Any
) -> None:
    """Issue 15: the page dropped the definition's inputs when it read a short link, so the
    link opened another job ("not submitted") without its files."""
    definition = {
        "image": IMAGE,
        "command": "cat /inputs/a.txt",
        "inputs": {"a.txt": {"type": "utf8", "value": "from the link\n"}},
    }
    status, body = await gateway.json("POST", "/q/short", json={"definition": definition})
    assert status == 200
    await page.goto(f"{gateway.url}/j/{body['jobId']}#?queue=short")
    await page.wait_for_function(
        "id => document.getElementById('job-id').textContent === id", arg=body["jobId"]
    )
    assert json.loads(await page.input_value("#definition")) == definition
    await page.wait_for_selector("#state[data-state='queued']")


async def test_a_short_link_without_a_queue_says_so_instead_of_a_sample_job(
    gateway: Gateway, page: Any
) -> None:
    """Before: /j/<id> with no queue silently showed a sample job."""
    job = "ab" * 32
    await page.goto(f"{gateway.url}/j/{job}")
    await page.wait_for_selector("#validation.bad:has-text('no queue')")
    assert job in await page.text_content("#validation")
    assert json.loads(await page.input_value("#definition")) == {}
    assert await page.is_disabled("#run")


async def test_a_short_link_without_a_queue_finds_the_job_on_an_exposed_queue(
    stack: Stack, busybox_image: str, page: Any
) -> None:
    """compute-queues' links carry no queue: on a gateway that exposes queues for lookups
    by id, /j/<id> opens that job on its queue, and an id on none of them says so."""
    gw = await stack.gateway(exposed_queues=("other", "shared"))
    await stack.worker("shared")
    definition = {"image": IMAGE, "command": "echo found by id"}
    status, sub = await gw.json(
        "POST", "/api/v1/queues/shared/jobs", json={"definition": definition}
    )
    assert status == 201, sub
    await gw.wait_job("shared", sub["jobId"])

    await page.goto(f"{gw.url}/j/{sub['jobId']}")
    await page.wait_for_selector("#state[data-state='success']")
    assert await page.input_value("#queue") == "shared"
    assert json.loads(await page.input_value("#definition")) == definition
    await page.wait_for_selector("#logs:has-text('found by id')")
    await shot(page, "queueless-found")

    await page.goto(f"{gw.url}/j/{'cd' * 32}")
    await page.wait_for_selector("#validation.bad:has-text('on the queues this gateway exposes')")
    assert await page.is_disabled("#run")


async def test_a_links_control_is_shown_and_sent_with_the_job(stack: Stack, page: Any) -> None:
    """compute-queues' `control` hash parameter (callbacks, namespace) was ignored: now the
    page shows it and sends it with the job, and the gateway calls back."""
    from receiver import Receiver, guide_function

    from asman.peer.callbacks import CallbackSettings
    from asman.peer.links import encode_hash_param

    receiver = await Receiver().start()
    try:
        gw = await stack.gateway(
            allow_urls=("127.0.0.1",), callbacks=CallbackSettings(first_delay_s=0.1)
        )
        control = {
            "namespace": "page-ns",
            "callbacks": {"queued": {"url": receiver.url("/queued"), "payload": {"from": "page"}}},
        }
        definition = {"image": IMAGE, "command": "echo with callbacks"}
        link = job_link(gw.url, definition, queue="controlled")
        link = link.replace("#?", f"#?control={encode_hash_param(control)}&", 1)
        await page.goto(link)
        await page.wait_for_function(
            "id => document.getElementById('job-id').textContent === id", arg=job_id(definition)
        )
        shown = await page.text_content("#control")
        assert shown == f"on queued → {receiver.url('/queued')} · namespace page-ns", shown
        await shot(page, "control-1-link")

        await page.click("#run")
        call = await receiver.delivered("/queued")
        assert call.json == {
            "event": "queued",
            "jobId": job_id(definition),  # the control is not part of the job
            "queue": "controlled",
            "namespace": "page-ns",
            "config": {"from": "page"},
        }
        status, job = await gw.json("GET", f"/api/v1/queues/controlled/jobs/{job_id(definition)}")
        assert status == 200 and job["control"] == control
        # the browser's key signed the submission, control included; the gateway, which
        # appended it, called back, and the guide's receiver check accepts it for this job
        _, info = await gw.json("GET", "/api/v1/info")
        assert job["submitter"] != info["peerId"] and job["namespaces"] == ["page-ns"]
        sender = guide_function("verify_asman_callback")(call.headers, call.body)
        assert sender == info["peerId"]
        check = guide_function("sent_by_the_job_peer")
        assert await asyncio.to_thread(check, gw.url, call.json, sender)
        await page.wait_for_selector("#control[data-whose='job']")
        await shot(page, "control-2-submitted")
    finally:
        await receiver.close()


async def test_a_bad_control_in_a_link_says_why_and_keeps_run_off(
    gateway: Gateway, page: Any
) -> None:
    from asman.peer.links import encode_hash_param

    definition = {"image": IMAGE, "command": "echo x"}
    bad = {"callbacks": {"queued": {"url": "ftp://example.org/hook"}}}
    link = job_link(gateway.url, definition, queue="q1")
    await page.goto(link.replace("#?", f"#?control={encode_hash_param(bad)}&", 1))
    await page.wait_for_selector("#control .bad:has-text('callbacks.queued.url')")
    # the job itself is fine: its id is shown; Run stays off rather than drop the callback
    await page.wait_for_function(
        "id => document.getElementById('job-id').textContent === id", arg=job_id(definition)
    )
    assert await page.is_disabled("#run")


async def test_a_queue_given_as_a_url_is_understood(gateway: Gateway, page: Any) -> None:
    """compute-queues accepts a queue URL (https://host/<queue>); the page disabled Run
    without a word. Now the name is read from the URL, and a URL it cannot read says why."""
    definition = {"image": IMAGE, "command": "echo by url"}
    # a link whose queue is a URL on another host: the queue is taken, the host said
    await page.goto(job_link(gateway.url, definition, queue="https://example.org/q/url-queue"))
    await page.wait_for_selector("#queue-note:has-text('queue url-queue, from the URL')")
    note = await page.text_content("#queue-note")
    assert note is not None and "example.org" in note and "127.0.0.1" in note, note
    await page.wait_for_function("() => !document.getElementById('run').disabled")
    await shot(page, "queue-url-1")
    await page.click("#run")
    await page.wait_for_selector("#state[data-state='queued']")
    status, job = await gateway.json("GET", f"/api/v1/queues/url-queue/jobs/{job_id(definition)}")
    assert status == 200 and job["queue"] == "url-queue", job

    # compute-queues' own form, on this gateway: nothing to say about another host
    await page.fill("#queue", f"{gateway.url}/plain-q")
    await page.wait_for_selector("#queue-note:text-is('queue plain-q, from the URL')")
    assert not await page.is_disabled("#run")

    for typed, says in (
        ("https://example.org/q/bad.name", "not a queue name"),
        ("https://example.org/", "names no queue"),
        (f"{gateway.url}/j/{'ab' * 32}", "job's link"),
        ("not a queue!", "is not a queue name"),
    ):
        await page.fill("#queue", typed)
        await page.wait_for_selector(f'#queue-note.bad:has-text("{says}")')
        assert await page.is_disabled("#run"), typed
    await shot(page, "queue-url-2-refused")


# -- each browser's own key (issue 14, item 4) ------------------------------------------------


@contextlib.asynccontextmanager
async def browser_page(browser: Any, init_script: str | None = None) -> AsyncIterator[Any]:
    """A page in a context of its own (its own IndexedDB: its own key), as the ``page``
    fixture makes one; fails the test on a page error."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    if init_script is not None:
        await context.add_init_script(init_script)
    pg = await context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield pg
    finally:
        await context.close()
    assert errors == [], errors


async def browser_key(page: Any) -> str:
    """The peer id of the page's own key, once the page has it."""
    await page.wait_for_selector("#your-key[data-peer-id]")
    key = await page.get_attribute("#your-key", "data-peer-id")
    assert key is not None and len(key) == 64
    return str(key)


async def gateway_peer_id(gw: Gateway) -> str:
    status, info = await gw.json("GET", "/api/v1/info")
    assert status == 200
    return str(info["peerId"])


async def test_a_stranger_cannot_cancel_a_job_run_from_the_page(stack: Stack, page: Any) -> None:
    """The attack: the page's job was signed by the gateway, so any HTTP client could cancel
    it through the same gateway. Now it is the browser's, and the gateway's key may not."""
    gw = await stack.gateway()
    definition = {"image": IMAGE, "command": "echo attack"}
    jid = job_id(definition)
    await page.goto(job_link(gw.url, definition, queue="attack"))
    await page.wait_for_selector("#validation:has-text('valid')")
    await page.click("#run")
    await page.wait_for_selector("#state[data-state='queued']")
    status, body = await gw.json("POST", f"/api/v1/queues/attack/jobs/{jid}/cancel")
    assert status == 403, body
    assert "may cancel" in body["error"]
    status, job = await gw.json("GET", f"/api/v1/queues/attack/jobs/{jid}")
    assert job["state"] == "queued" and not job["cancelRequested"]
    assert job["submitter"] != await gateway_peer_id(gw)


async def test_the_page_signs_with_its_browsers_own_key(stack: Stack, browser: Any) -> None:
    gw = await stack.gateway()
    peer = await stack.peer()
    definition = {"image": IMAGE, "command": "echo mine"}
    jid = job_id(definition)
    link = job_link(gw.url, definition, queue="keys")
    async with browser_page(browser) as mine:
        await mine.goto(link)
        key = await browser_key(mine)
        fingerprint = await mine.text_content("#your-key")
        assert fingerprint is not None and key[:4] in fingerprint.replace(" ", "")
        await mine.wait_for_selector("#validation:has-text('valid')")
        await mine.click("#run")
        await mine.wait_for_selector("#state[data-state='queued']")
        await mine.wait_for_selector("#submitter:has-text('you')")
        await shot(mine, "keys-1-submitted")

        # on the log, the job's submitter is this browser's key, not the gateway's
        state = await jobs.read_job(peer, "keys", jid)
        assert state is not None and state.rejected == 0
        assert state.submitter == key != await gateway_peer_id(gw)

        # the key stays with the browser: the same after a reload
        await mine.reload()
        assert await browser_key(mine) == key
        await mine.wait_for_selector("#state[data-state='queued']")

        # another browser (another context: another key) is refused, and says why
        async with browser_page(browser) as other:
            await other.goto(link)
            assert await browser_key(other) != key
            await other.wait_for_selector("#state[data-state='queued']")
            await other.wait_for_selector("#submitter:has-text('another key')")
            await other.click("#cancel")
            await other.wait_for_selector("#message:has-text('belongs to another key')")
            await shot(other, "keys-2-refused")
        _, job = await gw.json("GET", f"/api/v1/queues/keys/jobs/{jid}")
        assert job["state"] == "queued" and not job["cancelRequested"]

        # its own browser cancels it; the job moved between prepare and commit: the gateway
        # answers 409 and the page prepares again, once
        commits: list[int] = []
        subject = subjects.job_subject("keys", jid)

        async def move_first(route: Any) -> None:
            if not commits:
                last = await peer.last_seq(subjects.JOBS_STREAM, subject)
                await peer.append(subject, {"type": "note"}, expected_last_seq=last)
            response = await route.fetch()
            commits.append(response.status)
            await route.fulfill(response=response)

        await mine.route(f"**/jobs/{jid}/signed", move_first)
        await mine.click("#cancel")
        await mine.wait_for_selector("#state[data-state='cancelled']")
        assert commits == [409, 200]
        await shot(mine, "keys-3-cancelled")
    state = await jobs.read_job(peer, "keys", jid)
    assert state is not None and state.reason == "cancelled"
    cancels = [h for h in state.history if h.type == "cancel" and h.accepted]
    assert [h.signer for h in cancels] == [key]


async def test_without_ed25519_the_page_lets_the_gateway_sign_and_says_so(
    stack: Stack, browser: Any
) -> None:
    gw = await stack.gateway()
    no_ed25519 = (
        "crypto.subtle.generateKey = () => Promise.reject("
        "new DOMException('Unrecognized name', 'NotSupportedError'));"
    )
    definition = {"image": IMAGE, "command": "echo fallback"}
    jid = job_id(definition)
    async with browser_page(browser, no_ed25519) as pg:
        await pg.goto(job_link(gw.url, definition, queue="fallback"))
        await pg.wait_for_selector("#your-key:has-text('no key')")
        note = await pg.get_attribute("#your-key", "title")
        assert note is not None and "the gateway signs" in note
        await pg.wait_for_selector("#validation:has-text('valid')")
        await pg.click("#run")
        await pg.wait_for_selector("#state[data-state='queued']")
        _, job = await gw.json("GET", f"/api/v1/queues/fallback/jobs/{jid}")
        assert job["submitter"] == await gateway_peer_id(gw)
        await pg.click("#cancel")
        await pg.wait_for_selector("#state[data-state='cancelled']")
        await shot(pg, "keys-fallback")


async def test_the_page_shows_the_queue_policy_and_marks_a_trusted_worker(
    stack: Stack, busybox_image: str, page: Any
) -> None:
    import dataclasses

    from asman.log import queues
    from asman.log.policy import Policy, new_private_queue

    gw = await stack.gateway()
    owner = await stack.peer()
    queue = new_private_queue(owner.peer_id)
    worker = await stack.worker(queue)
    me = owner.peer_id
    await queues.write_policy(
        owner,
        queue,
        lambda _: dataclasses.replace(
            Policy(queue, 0, me, me), workers=frozenset({worker.log.peer_id})
        ),
    )
    definition = {"image": IMAGE, "command": "echo vetted"}
    await page.goto(job_link(gw.url, definition, queue=queue))
    await page.wait_for_selector("#policy-note:has-text('results from 1 listed worker')")
    await page.click("#run")
    await page.wait_for_selector("#state[data-state='success']")
    await page.wait_for_selector("#worker:has-text('trusted by the queue')")
    await shot(page, "policy-trusted")

    await stack.worker("openq")
    await page.goto(job_link(gw.url, definition, queue="openq"))
    await page.wait_for_selector("#policy-note:has-text('open (no policy)')")
    await page.click("#run")
    await page.wait_for_selector("#state[data-state='success']")
    await page.wait_for_selector("#worker:has-text('not vetted')")
