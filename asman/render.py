"""Terminal output of the CLI: progress bars, tables, live views and JSON shapes (rich)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from types import TracebackType
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from asman.log.events import JobState
from asman.log.workers import WorkerInfo
from asman.peer.client import Client

__all__ = [
    "Transfer",
    "jobs_table",
    "print_logs",
    "result_json",
    "show_job",
    "state_json",
    "watch_queue",
]

err = Console(stderr=True)
out = Console()


class Transfer:
    """A progress bar for uploads and downloads, shown only on a terminal."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal
        self._progress: Progress | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> Transfer:
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=err,
                transient=True,
            )
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, what: str, done: int, total: int) -> None:
        if self._progress is None:
            return
        if what not in self._tasks:
            self._tasks[what] = self._progress.add_task(what, total=total)
        self._progress.update(self._tasks[what], completed=done, total=total)


def _ago(ms: int | None) -> str:
    if not ms:
        return "-"
    s = max(0.0, time.time() - ms / 1000)
    if s < 60:
        return f"{s:.0f}s ago"
    if s < 3600:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.1f}h ago"


def _state_text(s: JobState) -> str:
    if s.result:
        code = f" ({s.result.exit_code})" if s.result.exit_code is not None else ""
        return f"{s.result.reason}{code}"
    if s.state == "running":
        return "running" if s.started_ms else "starting"
    return "queued"


def state_json(s: JobState, *, full: bool = False) -> dict[str, Any]:
    data: dict[str, Any] = {
        "job_id": s.job_id,
        "queue": s.queue,
        "state": s.state,
        "reason": s.reason,
        "tes_state": s.tes_state,
        "submitted_ms": s.submitted_ms,
        "started_ms": s.started_ms,
        "attempts": s.claims,
        "worker": s.lease.worker if s.lease else (s.result.worker if s.result else None),
        "cancel_requested": s.cancel_requested,
        "namespaces": list(s.namespaces),
    }
    if s.result:
        data.update(result_json(s))
    if full:
        data["definition"] = s.definition
        data["submitter"] = s.submitter
        data["history"] = [
            {
                "seq": h.seq,
                "type": h.type,
                "signer": h.signer,
                "ts": h.ts,
                "accepted": h.accepted,
                "note": h.note,
            }
            for h in s.history
        ]
    return data


def result_json(s: JobState) -> dict[str, Any]:
    r = s.result
    if r is None:
        return {"job_id": s.job_id, "state": s.state}
    return {
        "job_id": s.job_id,
        "reason": r.reason,
        "exit_code": r.exit_code,
        "oom_killed": r.oom_killed,
        "duration_ms": r.duration_ms,
        "message": r.message,
        "worker": r.worker,
        "attempt": r.attempt,
        "replaced_by": r.replaced_by,
        "outputs": [
            {"path": f.path, "size": f.blob.size, "sha256": f.blob.sha256, "key": f.blob.key}
            for f in r.outputs
        ],
    }


def _jobs(states: list[JobState]) -> Table:
    table = Table(title=None, expand=False)
    for col in ("job", "state", "attempts", "worker", "submitted", "duration"):
        table.add_column(col)
    for s in sorted(states, key=lambda x: x.submitted_ms, reverse=True)[:50]:
        worker = s.lease.worker if s.lease else (s.result.worker if s.result else "")
        dur = f"{s.result.duration_ms / 1000:.1f}s" if s.result and s.result.duration_ms else ""
        table.add_row(
            s.job_id[:12], _state_text(s), str(s.claims), worker[:12], _ago(s.submitted_ms), dur
        )
    return table


def _workers(workers: list[WorkerInfo]) -> Table:
    table = Table(expand=False)
    for col in ("worker", "host", "slots free", "gpus free", "running", "seen"):
        table.add_column(col)
    for w in workers:
        table.add_row(
            w.worker_id[:12],
            w.hostname,
            f"{w.free_slots}/{w.slots}",
            f"{w.free_gpus}/{w.gpus}",
            str(len(w.running)),
            _ago(w.ts),
        )
    return table


def jobs_table(states: list[JobState]) -> None:
    if not states:
        err.print("no jobs on this queue")
        return
    out.print(_jobs(states))


def show_job(s: JobState) -> None:
    import json

    out.print(f"[bold]job[/bold] {s.job_id}")
    out.print(f"queue     {s.queue}")
    out.print(f"state     {_state_text(s)}  (TES {s.tes_state})")
    out.print(f"attempts  {s.claims}")
    out.print(f"submitted {_ago(s.submitted_ms)} by {s.submitter[:12]}")
    if s.result:
        r = s.result
        out.print(f"worker    {r.worker[:12]}")
        if r.duration_ms is not None:
            out.print(f"duration  {r.duration_ms / 1000:.2f}s")
        if r.message:
            out.print(f"message   {r.message}")
        for f in r.outputs:
            out.print(f"output    {f.path} ({f.blob.size} bytes, sha256 {f.blob.sha256[:12]})")
    out.print("definition")
    out.print_json(json.dumps(s.definition))


async def print_logs(client: Client, queue: str, job_id: str) -> JobState:
    """Stream a job's logs as they come (stdout to stdout, the rest to stderr) until it
    finishes; a spinner shows the state while nothing is printed."""
    state_line = err.status("waiting for a worker…") if err.is_terminal else None
    if state_line is not None:
        state_line.start()

    async def states() -> None:
        async for s in client.watch(queue, job_id):
            if state_line is not None:
                state_line.update(f"{_state_text(s)}…")

    watcher = asyncio.create_task(states())
    try:
        async for chunk in client.follow_logs(queue, job_id):
            if state_line is not None:
                state_line.stop()
                state_line = None
            stream = sys.stdout.buffer if chunk.stream == "stdout" else sys.stderr.buffer
            stream.write(chunk.data)
            stream.flush()
        return await client.wait(queue, job_id)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher
        if state_line is not None:
            state_line.stop()


async def watch_queue(
    client: Client, queue: str, job_id: str | None, *, once: bool, stop: asyncio.Event
) -> None:
    """The live table: jobs and workers of a queue, refreshed on every change."""
    states: dict[str, JobState] = {s.job_id: s for s in await client.jobs(queue)}
    workers = await client.workers(queue)

    def view() -> Group:
        shown = [s for s in states.values() if job_id is None or s.job_id.startswith(job_id)]
        head = f"queue [bold]{queue}[/bold]: {len(shown)} job(s), {len(workers)} worker(s)"
        return Group(head, _jobs(shown), _workers(workers))

    if once or not out.is_terminal:
        out.print(view())
        return
    with Live(view(), console=out, refresh_per_second=4) as live:

        async def jobs_loop() -> None:
            async for s in client.watch_queue(queue):
                states[s.job_id] = s
                live.update(view())

        async def workers_loop() -> None:
            nonlocal workers
            while True:
                await asyncio.sleep(2)
                workers = await client.workers(queue)
                live.update(view())

        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(jobs_loop()), tg.create_task(workers_loop())]
            await stop.wait()
            for t in tasks:
                t.cancel()
