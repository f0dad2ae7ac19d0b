"""Upgrading a log from wire v1 (Asman 0.1) to wire v2 (docs/architecture.md, "Upgrading").

v1 kept job events in ``ASMAN_JOBS`` without a wire version in its metadata, dispatched
through the ``ASMAN_PENDING`` work queue with a durable consumer per (queue, class), and kept
heartbeats in the KV bucket ``ASMAN_WORKERS``. v2 refuses such streams. ``migrate`` carries
every unfinished v1 job over: it reads the v1 events, deletes the v1 streams (their consumers
go with them), creates the v2 ones and submits those jobs again, signed by the migrating key,
which becomes their submitter. Finished v1 results are not
carried over (nobody can sign a v2 result for a worker), their outputs stay in the blob store,
and a resubmission runs the job again.

Which v1 jobs are unfinished is read from the verified envelopes without the v1 fold: a job is
finished when its last ``finished`` or ``requeued`` event is a ``finished`` (or a ``cancel``
came before any claim). A job a v1 peer forged to look finished may be left behind; submitting
it again brings it back.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import nats.js.errors

from asman.errors import AsmanError, EnvelopeError, InvalidInput, LogError
from asman.log import jobs, subjects, wire
from asman.log.connection import Log, translate_errors
from asman.log.events import RawEvent

__all__ = ["Migration", "is_v1", "migrate"]

#: v1 kept heartbeats in a KV bucket; v2 in the plain stream ``ASMAN_WORKERS``
V1_WORKERS_BUCKET = "KV_ASMAN_WORKERS"

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Migration:
    """What ``migrate`` did (or, with ``dry_run``, would do)."""

    found_v1: bool = False
    jobs_seen: int = 0
    carried: list[tuple[str, str]] = field(default_factory=list)  # (queue, job id)
    finished_left: int = 0
    unreadable: int = 0

    def summary(self) -> str:
        if not self.found_v1:
            return "the log is already wire v2: nothing to migrate"
        return (
            f"migrated from wire v1: {len(self.carried)} unfinished job(s) submitted again, "
            f"{self.finished_left} finished result(s) not carried over"
            + (f", {self.unreadable} unreadable job(s) skipped" if self.unreadable else "")
        )


async def is_v1(log: Log) -> bool:
    """Whether this server holds wire-v1 streams."""
    with translate_errors("reading Asman's streams"):
        try:
            info = await log.js.stream_info(subjects.JOBS_STREAM)
        except nats.js.errors.NotFoundError:
            info = None
        if info is not None:
            metadata = info.config.metadata or {}
            return metadata.get(subjects.META_WIRE, "1") != str(wire.SCHEMA_VERSION)
        try:
            await log.js.stream_info(subjects.V1_PENDING_STREAM)
        except nats.js.errors.NotFoundError:
            return False
        return True


def _unfinished(subject: str, events: list[RawEvent]) -> tuple[str, str] | bool | None:
    """(definition JSON, class) of a v1 job that is not finished, None when it is finished,
    False when it has no readable submission."""
    definition: tuple[str, str] | None = None
    last = ""
    claimed = False
    for raw in events:
        try:
            event = wire.open_envelope(raw.data, subject).event
        except EnvelopeError:
            continue
        kind = event.get("type")
        if definition is None:
            text = event.get("definition")
            if kind == "submitted" and isinstance(text, str):
                job_class = event.get("class")
                definition = (text, job_class if job_class in ("cpu", "gpu") else "cpu")
            continue
        if kind == "claimed":
            claimed = True
        elif kind in ("finished", "requeued"):
            last = kind
            claimed = claimed and kind != "requeued"
        elif kind == "cancel" and not claimed:
            last = "finished"
    if definition is None:
        return False
    return None if last == "finished" else definition


async def migrate(log: Log, *, dry_run: bool = False) -> Migration:
    """Carry a v1 log's unfinished jobs over to v2 (see the module docstring). ``log`` is
    connected without stream set-up (``Log.connect(setup=False)``)."""
    report = Migration()
    if not await is_v1(log):
        return report
    report.found_v1 = True
    try:
        raw = await log.read_subject(subjects.JOBS_STREAM, "asman.job.>")
    except LogError as exc:
        if "not found" not in str(exc).lower():
            raise
        raw = []
    by_subject: dict[str, list[RawEvent]] = defaultdict(list)
    for ev in raw:
        by_subject[ev.subject].append(ev)
    todo: list[tuple[str, dict[str, object]]] = []
    for subject, events in by_subject.items():
        report.jobs_seen += 1
        try:
            queue, _ = subjects.job_id_from_subject(subject)
        except InvalidInput:  # not a job subject of ours
            report.unreadable += 1
            continue
        found = _unfinished(subject, events)
        if found is False:
            report.unreadable += 1
        elif found is None:
            report.finished_left += 1
        else:
            assert isinstance(found, tuple)
            try:
                definition = json.loads(found[0])
            except ValueError:
                report.unreadable += 1
                continue
            if isinstance(definition, dict):
                todo.append((queue, definition))
            else:
                report.unreadable += 1
    if dry_run:
        report.carried = [(q, "") for q, _ in todo]
        return report
    with translate_errors("removing the wire-v1 streams"):
        for name in (subjects.V1_PENDING_STREAM, subjects.JOBS_STREAM, V1_WORKERS_BUCKET):
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await log.js.delete_stream(name)
    await log.ensure_streams()
    for queue, definition in todo:
        try:
            done = await jobs.submit(log, queue, definition, via="migrated")
        except AsmanError as exc:  # one bad definition does not stop the others
            logger.warning("queue=%s a v1 job was not carried over: %s", queue, exc)
            report.unreadable += 1
            continue
        report.carried.append((queue, done.job_id))
    logger.info("%s", report.summary())
    return report
