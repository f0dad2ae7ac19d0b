"""The worker: finds waiting jobs of its queues (``asman.peer.dispatch``), claims them with
signed leases, runs them in hardened containers, and finishes them with fenced writes.

Shutdown (``stop`` set, e.g. on SIGTERM), in order:

1. stop dispatching: no new job is claimed;
2. running jobs get ``drain_grace_s`` to finish normally;
3. jobs still running are stopped (SIGTERM, grace, SIGKILL) and handed back with
   ``released`` (the index says they wait again) so another worker takes them at once;
4. final writes (finished events) run under ``asyncio.shield``;
5. heartbeats are removed; the caller closes the log (``drain()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from asman import __version__
from asman.errors import (
    AsmanError,
    BlobUnavailable,
    InvalidInput,
    LeaseLost,
    LogError,
    LogUnavailable,
    MessageTooLarge,
)
from asman.escape import one_line
from asman.log import jobs, subjects
from asman.log.blobs import BlobStore
from asman.log.connection import Log
from asman.log.definition import JobSpec, validate_relative_path
from asman.log.events import JobState, now_ms
from asman.log.leases import (
    Candidate,
    JobLease,
    by_process,
    claim,
    finish_lost,
    holder_alive,
    young,
)
from asman.log.steps import container_output_name, output_url, rw_folders
from asman.log.workers import WorkerInfo, beat, list_workers, remove
from asman.peer.callbacks import CallbackSender, CallbackSettings
from asman.peer.caps import (
    DEFAULT_LOG_BYTES,
    DEFAULT_OUTPUT_BYTES,
    DEFAULT_OUTPUT_FILES,
    DEFAULT_PIDS,
    DEFAULT_SHM,
    DEFAULT_TMP,
    Caps,
)
from asman.peer.dispatch import Dispatcher
from asman.peer.docker import ContainerSpec, RunOutcome
from asman.peer.inputs import InputFetcher
from asman.peer.jobdir import (
    DataDirLock,
    JobDir,
    abandoned,
    job_dir_at,
    prepare_job_dir,
    remove_job_dir,
)
from asman.peer.joblog import SPILL_BYTES, JobLog
from asman.peer.netguard import UrlPolicy, check_image_reference
from asman.peer.outputs import OutputLimits, manifest_fields, store_blob, store_outputs
from asman.peer.runtime import Runtime, docker_build, mounts_folders
from asman.peer.s3objects import upload_to_s3
from asman.peer.steps import SharedFolders
from asman.peer.watch import Running, Watching

__all__ = ["Runtime", "Worker", "WorkerConfig"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How soon a job whose claim failed on a log outage is tried again.
CLAIM_RETRY_S = 1.0
#: How much of the end of a step's stdout and stderr its result keeps.
STEP_TAIL_BYTES = 2048
#: How long a GPU job that a worker without enough GPUs left alone stays away from it.
GPU_HANDBACK_S = 10.0


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    queues: tuple[str, ...]
    data_dir: Path
    slots: int = 1
    gpus: tuple[str, ...] = ()
    max_job_duration_s: float = 3600.0
    labels: tuple[str, ...] = ()
    network: str = "none"
    #: a worker certificate (``asman certify``) its claims carry, for queues whose policy
    #: trusts workers certified by an institution's key
    cert: bytes | None = None
    once: bool = False
    drain_grace_s: float = 30.0
    kill_grace_s: float = 10.0
    heartbeat_s: float = 10.0
    scan_interval_s: float = 5.0
    sweep_interval_s: float = 120.0
    # ceilings for every job (asman.peer.caps; None: the default of its table)
    memory_limit_bytes: int | None = None
    cpus_limit: float | None = None
    pids_limit: int = DEFAULT_PIDS
    shm_limit_bytes: int = DEFAULT_SHM
    tmp_limit_bytes: int = DEFAULT_TMP
    inline_output_limit: int = 4096
    inline_outputs_total: int = 256 * 1024
    max_outputs: int = DEFAULT_OUTPUT_FILES
    max_output_bytes: int = DEFAULT_OUTPUT_BYTES
    url_input_limit: int = 2 * 1024**3
    url_timeout_s: float = 600.0
    live_log_limit: int = 4 * 1024 * 1024
    total_log_limit: int = DEFAULT_LOG_BYTES
    allow_urls: tuple[str, ...] = ()
    #: the input cache (default ``<data_dir>/cache``; the processes of one supervisor share one)
    cache_dir: Path | None = None
    #: how many worker processes share this host's share of memory (``--procs``)
    procs: int = 1
    #: how often containers left by a dead worker on this engine are looked for
    orphan_sweep_s: float = 30.0
    #: how ``finished`` callbacks are delivered (``asman.peer.callbacks``)
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)

    def __post_init__(self) -> None:
        if not self.queues:
            raise InvalidInput("a worker needs at least one queue")
        for q in self.queues:
            subjects.validate_queue(q)
        if self.slots < 1:
            raise InvalidInput(f"--slots must be at least 1, got {self.slots}")
        if self.network not in ("none", "bridge"):
            raise InvalidInput(f"--network must be 'none' or 'bridge', got {self.network!r}")
        if len(set(self.gpus)) != len(self.gpus):
            raise InvalidInput("--gpus lists a device twice")
        self.caps()  # checks the ceilings
        UrlPolicy.parse(self.allow_urls)

    def caps(self) -> Caps:
        """The ceilings every job of this worker runs under."""
        return Caps.defaults(
            self.slots * self.procs,
            memory_bytes=self.memory_limit_bytes,
            cpus=self.cpus_limit,
            pids=self.pids_limit,
            shm_bytes=self.shm_limit_bytes,
            tmp_bytes=self.tmp_limit_bytes,
            output_bytes=self.max_output_bytes,
            output_files=self.max_outputs,
            log_bytes=self.total_log_limit,
        )


class Worker:
    """One worker process's job loop. ``await worker.run(stop)`` until ``stop`` is set."""

    def __init__(self, log: Log, blobs: BlobStore, runtime: Runtime, config: WorkerConfig) -> None:
        self.log = log
        self.blobs = blobs
        self.runtime = runtime
        self.config = config
        self.worker_id = log.peer_id
        self.caps = config.caps()
        digest = hashlib.sha256(str(config.data_dir.resolve()).encode()).hexdigest()
        self.instance = f"{log.peer_id[:16]}-{digest[:16]}"
        self.data_dir_label = str(config.data_dir.resolve())
        self._free = config.slots
        self._free_gpus = list(config.gpus)
        self._slot_freed = asyncio.Event()
        self._running: dict[str, Running] = {}
        self._finishing = 0  # jobs past their container that gave their slot back
        self._done_once = asyncio.Event()
        self._hostname = socket.gethostname()
        self.dispatcher = Dispatcher(
            log,
            config.queues,
            scan_interval_s=config.scan_interval_s,
            sweep_interval_s=config.sweep_interval_s,
            memory_bytes=self.caps.memory_bytes,  # a job asking more is left to others
            labels=config.labels,  # and one with a tag we do not have
        )
        self.jobs_done = 0
        #: set after each round of heartbeats (a test or a supervisor may wait on it)
        self.beaten = asyncio.Event()
        self.inputs = InputFetcher(
            blobs,
            cache_dir=config.cache_dir or config.data_dir / "cache",
            url_limit=config.url_input_limit,
            url_timeout_s=config.url_timeout_s,
            policy=UrlPolicy.parse(config.allow_urls),
        )
        #: the ``finished`` callbacks of the jobs this worker finishes, under the same URL
        #: rules as the jobs' inputs
        self.callbacks = CallbackSender(
            log.key, UrlPolicy.parse(config.allow_urls), config.callbacks
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        (cfg.data_dir / "jobs").mkdir(parents=True, exist_ok=True)
        with DataDirLock(cfg.data_dir):
            async with self.callbacks:
                await self._run(stop)

    async def _run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        # Containers carry this instance id; holding the data dir's lock, anything labelled
        # with it belongs to a worker that died here: remove it (never a live sibling's).
        removed = await self.runtime.cleanup_orphans(self.instance)
        if removed:
            logger.info("removed %d orphaned container(s) of an earlier run", removed)
        await self._remove_orphans()
        await self._beat_all(draining=False)  # seen by the others before our first claim
        await self.dispatcher.open()
        stop_fetching = asyncio.Event()
        logger.info(
            "worker=%s queues=%s slots=%d gpus=%d network=%s",
            self.worker_id[:12],
            ",".join(cfg.queues),
            cfg.slots,
            len(cfg.gpus),
            cfg.network,
        )
        try:
            async with asyncio.TaskGroup() as tg:
                drained = asyncio.Event()
                beats = tg.create_task(self._heartbeats(stop_fetching, drained))
                sweeps = tg.create_task(self._orphan_sweeps(drained))
                dispatching = tg.create_task(self._dispatch_loop(stop_fetching, tg))
                waiters = [asyncio.ensure_future(stop.wait())]
                if cfg.once:
                    waiters.append(asyncio.ensure_future(self._done_once.wait()))
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for w in waiters:
                    w.cancel()
                # 1. stop fetching
                stop_fetching.set()
                await dispatching
                # 2. let running jobs finish within the grace period
                await self._drain(cfg.drain_grace_s)
                drained.set()
                beats.cancel()
                sweeps.cancel()
        finally:
            await self.dispatcher.close()
            # 5. remove heartbeats
            for q in cfg.queues:
                with contextlib.suppress(AsmanError):
                    await asyncio.shield(remove(self.log, q))

    async def _drain(self, grace_s: float) -> None:
        if not self._running:
            return
        logger.info("draining: %d job(s) running, grace %.0fs", len(self._running), grace_s)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace_s):
                while self._running:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
        # 3. hand back what is still running (a job whose container is gone is finishing:
        # its result is being written, let it land)
        for running in list(self._running.values()):
            if running.exited:
                continue
            running.why = running.why or "handback"
            running.stop.set()
        while self._running:
            self._slot_freed.clear()
            await self._slot_freed.wait()

    # -- loops -------------------------------------------------------------------------

    async def _beat_all(self, *, draining: bool) -> None:
        """One heartbeat for each of our queues (a few at a time)."""
        limit = asyncio.Semaphore(32)

        async def one(q: str) -> None:
            info = WorkerInfo(
                worker_id=self.worker_id,
                queue=q,
                slots=self.config.slots,
                free_slots=self._free,
                gpus=len(self.config.gpus),
                free_gpus=len(self._free_gpus),
                memory_bytes=self.caps.memory_bytes,
                max_job_duration_ms=int(self.config.max_job_duration_s * 1000),
                labels=self.config.labels,
                running=tuple(self._running),
                version=__version__,
                hostname=self._hostname,
                network=self.config.network,
                draining=draining,
            )
            async with limit:
                try:
                    await beat(self.log, info)
                except LogError as exc:  # a reconnect in progress: try again next beat
                    logger.warning("heartbeat failed: %s", exc)

        await asyncio.gather(*(one(q) for q in self.config.queues))
        self.beaten.set()

    async def _heartbeats(self, stopping: asyncio.Event, done: asyncio.Event) -> None:
        """Beat every ``heartbeat_s`` until ``done`` (after the drain; while draining the
        beats say so). Ends on ``done`` rather than only on cancellation: a cancel that lands
        inside the NATS client can be swallowed there."""
        while not done.is_set():
            await self._beat_all(draining=stopping.is_set())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.heartbeat_s):
                    await done.wait()

    async def _remove_orphans(self) -> None:
        """Remove the containers that dead workers on this Docker engine left: a sibling
        killed with ``-9``, a process of ``--procs`` that died (their data dirs' locks are
        free). Never a live worker's; a failure is logged and tried again next sweep."""
        own = self.data_dir_label

        def gone(data_dir: str) -> bool:
            return data_dir != own and abandoned(data_dir)

        try:
            removed = await self.runtime.cleanup_orphans(abandoned=gone)
        except AsmanError as exc:
            logger.warning("could not look for orphaned containers: %s", exc)
            return
        if removed:
            logger.warning("removed %d container(s) left by a worker that died", removed)

    async def _orphan_sweeps(self, done: asyncio.Event) -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.orphan_sweep_s):
                    await done.wait()
            if not done.is_set():
                await self._remove_orphans()

    async def _wait_free_slot(self, stopping: asyncio.Event) -> bool:
        """Until a slot is free (False once ``stopping``)."""
        while self._free <= 0 and not stopping.is_set():
            self._slot_freed.clear()
            waiters = [
                asyncio.ensure_future(self._slot_freed.wait()),
                asyncio.ensure_future(stopping.wait()),
            ]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        return not stopping.is_set()

    def _can_take(self, cand: Candidate) -> bool:
        """GPU jobs go to workers with GPUs; a worker without takes one only to refuse it
        with the reason, when no worker on the queue has any GPU."""
        if cand.job_class != "gpu" or self.config.gpus:
            return True
        index = self.dispatcher.indexes[cand.queue]
        return not any(w.gpus > 0 for w in index.workers.values())

    async def _dispatch_loop(self, stopping: asyncio.Event, tg: asyncio.TaskGroup) -> None:
        """Take a slot, find a job for it, claim and run it; again, until ``stopping``."""
        cfg = self.config
        while await self._wait_free_slot(stopping):
            if cfg.once and self.jobs_done:
                return
            cand = await self.dispatcher.next(stopping, self._can_take)
            if cand is None:
                return
            self._free -= 1
            self.dispatcher.taken(cand)
            if cfg.once:
                await self._job(cand, stopping)  # one at a time: run one job, then exit
            else:
                tg.create_task(self._job(cand, stopping), name=f"job-{cand.job_id[:8]}")

    def _release_slot(self, gpus: tuple[str, ...] = ()) -> None:
        self._free += 1
        self._free_gpus.extend(gpus)
        self._slot_freed.set()

    # -- one job -----------------------------------------------------------------------

    async def _gpu_job_is_ours(self, cand: Candidate) -> bool:
        """Before claiming a GPU job: False (and the job left alone for a while, no event
        written) when another worker should take it, or our GPUs are busy."""
        state = await jobs.read_job(self.log, cand.queue, cand.job_id)
        if state is None or state.finished:
            return True  # claim() finds nothing to do
        try:
            wanted = JobSpec.from_definition(state.definition).gpus
        except AsmanError:
            return True  # claim, then finish as error with the reason
        if wanted <= len(self._free_gpus):
            return True
        if wanted <= len(self.config.gpus):
            self.dispatcher.done(cand, retry_after_s=1.0)  # ours, but our GPUs are busy now
            return False
        others = [
            w for w in await list_workers(self.log, cand.queue) if w.worker_id != self.worker_id
        ]
        if any(w.gpus >= wanted for w in others):
            self.dispatcher.done(cand, retry_after_s=GPU_HANDBACK_S)
            return False
        return True  # nobody has enough GPUs: claim it and refuse it with the reason

    def _network(self, queue: str) -> str:
        """The worker's network for a job of ``queue``, unless the queue's policy forbids
        its containers a network."""
        view = self.log.policies.known(queue)
        policy = view.current if view else None
        if policy is not None and not policy.ceilings.network and self.config.network != "none":
            logger.info("queue %s: its policy allows no network: the job runs without", queue)
            return "none"
        return self.config.network

    def _exited(self, running: Running) -> None:
        """The container is gone: its slot (and GPUs) go to the next job while this one's
        outputs are stored and its result is written, as long as no more jobs than there are
        slots are finishing so (the work that is not a container stays bounded too)."""
        running.exited = True
        if running.holds_slot and self._finishing < self.config.slots:
            running.holds_slot = False
            self._finishing += 1
            self._release_slot(running.gpus)

    async def _alive(self, state: JobState) -> bool:
        """Before a challenge: the holder's heartbeat, read now (the dispatcher's view may
        be a scan old); a claim younger than a heartbeat's life needs no read."""
        if state.lease is not None and young(self.log, state.lease):
            return True
        workers = by_process(await list_workers(self.log, state.queue))
        return holder_alive(state, workers, self.log.heartbeat_ttl_ms)

    async def _job(self, cand: Candidate, stopping: asyncio.Event) -> None:
        gpus: tuple[str, ...] = ()
        running: Running | None = None
        lease: JobLease | None = None
        claimed = False
        try:
            if cand.job_class == "gpu" and not await self._gpu_job_is_ours(cand):
                claimed = True  # done() was called, with when to look at the job again
                return
            hint = cand.entry.seq if cand.waiting else 0
            try:
                lease = await claim(
                    self.log, cand.queue, cand.job_id, hint, alive=self._alive, stop=stopping
                )
            except LogUnavailable as exc:
                # a leader election or a reconnect: try again shortly (a claim that did
                # land is ours, and the next try finds it)
                logger.warning("job=%s claim failed, trying again: %s", cand.job_id, exc)
                self.dispatcher.done(cand, retry_after_s=CLAIM_RETRY_S)
                claimed = True  # done() was called
                return
            if lease is None:
                return
            self.dispatcher.claimed(cand)
            claimed = True
            if self.dispatcher.shared(cand.queue):
                # other workers take from this queue: tell them at once that the job is
                # taken (else they find out by a refused compare-and-set); alone on the
                # queue, the watcher says so a quarter second in, if the job lasts
                await lease.announce()
            if lease.spent:
                await asyncio.shield(finish_lost(lease))
                return
            if lease.state.cancel_requested:
                await asyncio.shield(lease.finish({"reason": "cancelled", "message": "cancelled"}))
                return
            try:
                spec = JobSpec.from_definition(lease.state.definition)
            except AsmanError as exc:
                await self._finish_error(lease, f"invalid definition: {exc}")
                return
            if (spec.memory and spec.memory > self.caps.memory_bytes) or not set(spec.tags) <= set(
                self.config.labels
            ):
                # its waiting entry did not say so (written by an older peer, or forged):
                # hand it back untried for a worker that allows that much or has those
                # labels, and remember it
                self.dispatcher.learn(lease.job_id, lease.state.definition)
                await asyncio.shield(self._riding_out(lease, lease.release))
                return
            if spec.gpus:
                got = await self._take_gpus(lease, spec.gpus)
                if got is None:
                    return
                gpus = got
            running = Running(lease, gpus=gpus)
            self._running[lease.job_id] = running
            try:
                await self._run_claimed(running, spec)
            finally:
                self._running.pop(lease.job_id, None)
                self.jobs_done += 1
                if self.config.once:
                    self._done_once.set()
        except LeaseLost as exc:
            logger.warning("job=%s lease lost: %s", cand.job_id, exc)
        except AsmanError as exc:
            logger.error("job=%s failed in the worker: %s", cand.job_id, exc)
        except Exception as exc:
            # the last wall: a fault anywhere on the job's path ends the job (when we hold
            # it and it is not over yet), never the worker's task group
            logger.exception("job=%s failed in the worker", cand.job_id)
            if lease is not None and not lease.done:
                with contextlib.suppress(AsmanError):
                    await self._finish_error(lease, job_fault(exc))
        finally:
            if not claimed:
                self.dispatcher.done(cand)
            if lease is not None:
                self._callback(lease)
            if running is None or running.holds_slot:
                self._release_slot(gpus)
            else:
                self._finishing -= 1
                self._slot_freed.set()  # wakes a drain waiting for the running jobs to end

    def _callback(self, lease: JobLease) -> None:
        """The job's ``finished`` callback, when our event finished it (a result, or a
        release that ended a cancelled job): the worker is the one that knows."""
        state = lease.state
        if lease.done and state.result is not None and state.result.worker == self.worker_id:
            self.callbacks.finished(state)

    async def _take_gpus(self, lease: JobLease, wanted: int) -> tuple[str, ...] | None:
        if wanted > len(self.config.gpus):
            workers = await list_workers(self.log, lease.queue)
            if not any(w.gpus >= wanted for w in workers):
                await self._finish_error(
                    lease,
                    f"the job asks for {wanted} GPUs and no worker on queue {lease.queue!r} "
                    f"has that many (most: {max((w.gpus for w in workers), default=0)})",
                )
            else:
                await lease.release()
            return None
        if wanted > len(self._free_gpus):
            await lease.release()  # busy now; another worker (or we, later) takes it
            await asyncio.sleep(0.5)
            return None
        taken = tuple(self._free_gpus[:wanted])
        del self._free_gpus[:wanted]
        return taken

    async def _riding_out(self, lease: JobLease, op: Callable[[], Awaitable[T]]) -> T:
        """Run a fenced append (``start``, ``release``) through a short log outage: each is a
        compare-and-set, so a retry is safe; gives up once the lease could have run out."""
        deadline = time.monotonic() + max(10.0, self.log.config.lease_ttl_s)
        delay = 0.25
        while True:
            try:
                return await op()
            except LogUnavailable:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _start(self, running: Running) -> None:
        """Append ``started``; if it cannot be (the lease was lost, or the log stays out),
        stop the container: its result could not be written."""
        try:
            await self._riding_out(running.lease, running.lease.start)
        except LeaseLost:
            running.why = "lost"
            running.stop.set()
            raise
        except BaseException:
            running.why = running.why or "handback"
            running.stop.set()
            raise

    async def _finish(self, lease: JobLease, result: dict[str, Any]) -> JobState:
        """``lease.finish`` that rides out a short log outage (a leader election): the append
        is a compare-and-set, so retrying is safe, and a retry that finds our own result
        already accepted (the first reply was lost) is done. A result the log refuses as too
        large ends the job ``error`` with the reason (never ``worker_lost``)."""
        deadline = time.monotonic() + max(10.0, self.log.rules.lease_ms / 1000)
        delay, retried = 0.25, False
        while True:
            try:
                return await lease.finish(result)
            except MessageTooLarge as exc:
                if result.get("reason") == "error" and "outputs" not in result:
                    raise
                logger.warning("job=%s result too large to record: %s", lease.job_id, exc)
                result = {
                    "reason": "error",
                    "message": f"the job's result could not be recorded: {exc}"[:4000],
                    **({"log": result["log"]} if "log" in result else {}),
                }
            except LogUnavailable:
                if time.monotonic() > deadline:
                    raise
                retried = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            except LeaseLost:
                if not retried:
                    raise
                state = await jobs.read_job(self.log, lease.queue, lease.job_id)
                mine = (
                    state is not None
                    and state.result is not None
                    and (
                        state.result.worker == self.worker_id
                        and state.result.attempt == lease.attempt
                    )
                )
                if not mine:
                    raise
                assert state is not None
                await lease.mark_done()
                lease.state, lease.done = state, True  # our finished, found on the log
                return state

    async def _finish_error(self, lease: JobLease, message: str) -> None:
        logger.info("job=%s queue=%s error: %s", lease.job_id, lease.queue, message)
        await asyncio.shield(lease.finish({"reason": "error", "message": message[:4000]}))

    async def _run_claimed(self, running: Running, spec: JobSpec) -> None:
        lease, cfg = running.lease, self.config
        folders = mounts_folders(self.runtime)
        if folders:
            job_dir = await asyncio.to_thread(
                prepare_job_dir, cfg.data_dir / "jobs", lease.job_id, lease.attempt
            )
        else:
            job_dir = job_dir_at(cfg.data_dir / "jobs", lease.job_id, lease.attempt)
        started = now_ms()
        outcome: RunOutcome | None = None
        result: dict[str, Any]
        joblog: JobLog | None = None
        try:
            watching = Watching(running)
            try:
                async with JobLog(
                    self.log,
                    lease.queue,
                    lease.job_id,
                    lease.attempt,
                    job_dir.root / "run.log",
                    live_limit=cfg.live_log_limit,
                    total_limit=cfg.total_log_limit,
                    spill_bytes=max(SPILL_BYTES, cfg.inline_output_limit),
                ) as joblog:
                    try:
                        shared = None
                        if folders and (spec.steps or spec.output_paths):
                            shared = SharedFolders(
                                job_dir.root,
                                job_dir.inputs,
                                job_dir.outputs,
                                rw_folders(lease.state.definition),
                                max_files=cfg.max_outputs,
                            )
                            await asyncio.to_thread(shared.make)
                        steps: list[dict[str, Any]] = []
                        outcome = await self._execute(running, spec, job_dir, joblog, shared, steps)
                        if running.why in ("lost", "handback"):
                            result = {}
                        else:
                            result = await self._collect(
                                running,
                                outcome,
                                job_dir.outputs if folders else None,
                                joblog,
                                shared,
                                spec,
                            )
                            if spec.steps:
                                result["steps"] = steps
                    except (LogUnavailable, BlobUnavailable) as exc:
                        # the log or the blob store is unreachable (an election, a
                        # partition): not the job's failure; hand it back so it runs
                        # again, never finish it as error
                        logger.warning(
                            "job=%s log unavailable, handing back: %s", lease.job_id, exc
                        )
                        running.why = running.why or "handback"
                        result = {}
                    except (AsmanError, OSError) as exc:
                        joblog.system(f"error: {exc}")
                        result = {"reason": "error", "message": one_line(str(exc))[:4000]}
                    except Exception as exc:
                        # the boundary: whatever a job's content makes us raise ends that
                        # job, never the worker (the trace goes to the operator's log)
                        logger.exception("job=%s failed in the worker", lease.job_id)
                        message = job_fault(exc)
                        joblog.system(f"error: {message}")
                        result = {"reason": "error", "message": message}
                # the logs are complete once the JobLog is closed
                if running.why not in ("lost", "handback"):
                    try:
                        result["log"] = await self._store_log(joblog.content("run"))
                        if joblog.build_size:
                            result["build_log"] = await self._store_log(joblog.content("build"))
                    except (LogUnavailable, BlobUnavailable) as exc:
                        # the run is over; a result without its log would lose it: hand
                        # the job back, unless it was cancelled (finished without the log)
                        logger.warning("job=%s log not stored: %s", lease.job_id, exc)
                        if running.why != "cancelled":
                            running.why = "handback"
            finally:
                running.stop.set()
                await watching.stop()
            if running.why == "lost":
                logger.warning("job=%s lease lost; result discarded", lease.job_id)
            elif running.why == "handback":
                try:
                    await asyncio.shield(self._riding_out(lease, lease.release))
                    logger.info("job=%s handed back", lease.job_id)
                except (LogUnavailable, LeaseLost) as exc:
                    # our heartbeat stops listing the job: another worker challenges our
                    # lease and takes the job over
                    logger.warning(
                        "job=%s not handed back (%s); another worker will take it over",
                        lease.job_id,
                        exc,
                    )
            else:
                if running.why == "cancelled":
                    result.update(reason="cancelled", message="cancelled")
                state = await asyncio.shield(self._finish(lease, result))
                logger.info(
                    "job=%s queue=%s attempt=%d worker=%s reason=%s exit=%s dur=%dms",
                    lease.job_id,
                    lease.queue,
                    lease.attempt,
                    self.worker_id[:12],
                    state.reason,
                    outcome.exit_code if outcome else None,
                    now_ms() - started,
                )
        finally:
            # the folder, if one was made: by us for a runtime that mounts folders, or by a
            # log that spilled to a file
            if folders or (joblog is not None and joblog.spilled):
                await asyncio.to_thread(remove_job_dir, job_dir)

    async def _execute(
        self,
        running: Running,
        spec: JobSpec,
        job_dir: JobDir,
        joblog: JobLog,
        shared: SharedFolders | None = None,
        steps: list[dict[str, Any]] | None = None,
    ) -> RunOutcome:
        lease, cfg = running.lease, self.config
        limits = self.caps.for_job(spec)
        limit_s = cfg.max_job_duration_s
        if spec.max_duration_ms is not None:
            limit_s = min(limit_s, spec.max_duration_ms / 1000)
        # the job's time runs from here: its inputs, its image and its container share it
        began = time.monotonic()
        deadline = began + limit_s

        async def on_build_log(line: str) -> None:
            joblog.write("build", line.encode() if line.endswith("\n") else (line + "\n").encode())

        network = self._network(lease.queue)

        async def prepare() -> tuple[list[tuple[Path, str]], str]:
            mounts: list[tuple[Path, str]] = []
            if mounts_folders(self.runtime):
                mounts = await self.inputs.materialize(
                    spec, job_dir.inputs, job_dir.root / "config"
                )
            for step_image in sorted({s.image for s in spec.steps if s.image}):
                await check_image_reference(step_image, self.inputs.policy)
                await self.runtime.ensure_image(step_image, on_build_log)
            if spec.build is None and spec.image is None:
                return mounts, ""  # every step names its own image
            if spec.build is not None:
                image = await self.runtime.build(
                    docker_build(spec.build),
                    work_dir=job_dir.root / "build",
                    fetch_context=self.inputs.fetch_context,
                    on_log=on_build_log,
                    network=network,
                    memory_bytes=limits.memory_bytes,
                    cpus=limits.cpus,
                )
            else:
                assert spec.image is not None
                await check_image_reference(spec.image, self.inputs.policy)
                await self.runtime.ensure_image(spec.image, on_build_log)
                image = spec.image
            return mounts, image

        try:
            mounts, image = await _until_stopped(running, prepare(), deadline)
        except _Interrupted as stopped:
            # cancelled, lost, handed back, or out of time before the container ran: the
            # download or the build was stopped at once (the engine cancels a build whose
            # request is closed)
            if stopped.timed_out:
                joblog.system(
                    f"timed out after {limit_s:g}s while fetching inputs or preparing the "
                    "image: stopped"
                )
            self._exited(running)
            now = now_ms()
            return RunOutcome(
                exit_code=None,
                oom_killed=False,
                timed_out=stopped.timed_out,
                stopped=True,
                started_ms=now,
                ended_ms=now,
                duration_ms=int((time.monotonic() - began) * 1000),
            )
        container = ContainerSpec(
            job_id=lease.job_id,
            queue=lease.queue,
            worker_id=self.instance,
            attempt=lease.attempt,
            image=image,
            command=list(spec.command) if spec.command is not None else None,
            entrypoint=list(spec.entrypoint) if spec.entrypoint is not None else None,
            env=spec.env,
            workdir=spec.workdir,
            inputs_dir=job_dir.inputs,
            outputs_dir=job_dir.outputs,
            extra_mounts=tuple(mounts),
            cpus=limits.cpus,
            memory_bytes=limits.memory_bytes,
            shm_size_bytes=limits.shm_bytes,
            gpu_devices=running.gpus,
            network=network,
            pids_limit=limits.pids,
            tmpfs_size=f"{limits.tmp_bytes // 1024}k",
            data_dir=self.data_dir_label,
        )
        # ``started`` goes out while the runtime starts the container: a round trip off the
        # path to the job running. The result is written only on top of it (awaited below),
        # and a start that fails stops the container.
        starting = asyncio.ensure_future(self._start(running))
        try:
            if spec.steps:
                assert steps is not None
                outcome = await self._run_steps(
                    running, spec, container, shared, joblog, deadline, steps
                )
            else:
                outcome = await self.runtime.run(
                    container,
                    on_output=joblog.on_output,
                    stop=running.stop,
                    timeout_s=max(0.001, deadline - time.monotonic()),
                    grace_s=cfg.kill_grace_s,
                )
        except BaseException:
            # a second cancel can land while we wait for it: the task then ends on its own,
            # and its outcome is still read (and logged) rather than left behind
            starting.add_done_callback(_log_failed_start)
            with contextlib.suppress(Exception):
                await asyncio.shield(starting)
            raise
        self._exited(running)
        await starting
        if outcome.timed_out:
            joblog.system(f"timed out after {limit_s:g}s: stopped")
        if outcome.oom_killed:
            joblog.system("the container ran out of memory and was killed")
        return outcome

    async def _run_steps(
        self,
        running: Running,
        spec: JobSpec,
        base: ContainerSpec,
        shared: SharedFolders | None,
        joblog: JobLog,
        deadline: float,
        results: list[dict[str, Any]],
    ) -> RunOutcome:
        """Run a multi-step job's steps in order, each in its own hardened container (the
        job's, with the step's image, argv, env and workdir, and the shared folders), until
        one fails without ``ignoreError``, the job is stopped, or its time is up. Each step's
        outcome goes into ``results``; the job's outcome is the first failing step's, else
        success."""
        total = len(spec.steps)
        outcomes: list[RunOutcome] = []
        failed: RunOutcome | None = None
        for step in spec.steps:
            if running.stop.is_set() or time.monotonic() >= deadline:
                break
            label = f"step {step.index + 1} of {total} ({step.name})"
            files: dict[str, Any] = {}
            output = _StepOutput(joblog, files)
            try:
                stdin = None
                if step.stdin is not None:
                    if shared is None:
                        raise InvalidInput(f"{label}: this runtime cannot redirect stdin")
                    stdin = await asyncio.to_thread(shared.stdin_file, step.stdin)
                for stream in ("stdout", "stderr"):
                    target = getattr(step, stream)
                    if target is not None:
                        if shared is None:
                            raise InvalidInput(f"{label}: this runtime cannot redirect {stream}")
                        files[stream] = await asyncio.to_thread(shared.open_redirect, target)

                container = replace(
                    base,
                    image=step.image or base.image,
                    command=list(step.command) if step.command is not None else None,
                    entrypoint=list(step.entrypoint) if step.entrypoint is not None else None,
                    env=step.env,
                    workdir=step.workdir or base.workdir,
                    rw_mounts=shared.mounts if shared is not None else (),
                    stdin_file=stdin,
                )
                outcome = await self.runtime.run(
                    container,
                    on_output=output,
                    stop=running.stop,
                    timeout_s=max(0.001, deadline - time.monotonic()),
                    grace_s=self.config.kill_grace_s,
                )
            finally:
                for f in files.values():
                    await asyncio.to_thread(f.close)
            outcomes.append(outcome)
            results.append(
                {
                    "name": step.name,
                    "exit_code": outcome.exit_code,
                    "started_ms": outcome.started_ms,
                    "ended_ms": outcome.ended_ms,
                    **{k: bytes(v).decode(errors="replace") for k, v in output.tails.items()},
                }
            )
            if outcome.timed_out or outcome.stopped:
                break
            if outcome.exit_code != 0:
                if step.ignore_error:
                    joblog.system(f"{label} exited with {outcome.exit_code}; ignored (ignoreError)")
                    continue
                joblog.system(f"{label} exited with {outcome.exit_code}: the job ends failed")
                failed = outcome
                break
        if not outcomes:
            now = now_ms()
            return RunOutcome(None, False, time.monotonic() >= deadline, True, now, now, 0)
        last = outcomes[-1]
        chosen = failed or last
        return RunOutcome(
            exit_code=chosen.exit_code if (failed or last.timed_out or last.stopped) else 0,
            oom_killed=any(o.oom_killed for o in outcomes),
            timed_out=last.timed_out,
            stopped=last.stopped,
            started_ms=outcomes[0].started_ms,
            ended_ms=last.ended_ms,
            duration_ms=sum(o.duration_ms for o in outcomes),
            output_dropped_bytes=sum(o.output_dropped_bytes for o in outcomes),
        )

    async def _collect(
        self,
        running: Running,
        outcome: RunOutcome,
        outputs_dir: Path | None,
        joblog: JobLog,
        shared: SharedFolders | None = None,
        spec: JobSpec | None = None,
    ) -> dict[str, Any]:
        cfg = self.config
        limits = OutputLimits(
            max_files=cfg.max_outputs,
            max_bytes=cfg.max_output_bytes,
            inline_limit=cfg.inline_output_limit,
            inline_total=cfg.inline_outputs_total,
        )
        manifest = await store_outputs(self.blobs, outputs_dir, limits, joblog.system)
        if shared is not None and spec is not None and spec.output_paths:
            manifest += await self._collect_paths(shared, spec, manifest, limits, joblog)
        listed = await manifest_fields(self.blobs, manifest)
        if running.why == "cancelled":
            reason = "cancelled"
        elif outcome.timed_out:
            reason = "timed_out"
        elif outcome.exit_code == 0:
            reason = "success"
        else:
            reason = "failed"
        return {
            "reason": reason,
            "exit_code": outcome.exit_code,
            "oom_killed": outcome.oom_killed,
            "duration_ms": outcome.duration_ms,
            **listed,
            "message": "",
        }

    async def _collect_paths(
        self,
        shared: SharedFolders,
        spec: JobSpec,
        manifest: list[dict[str, Any]],
        limits: OutputLimits,
        joblog: JobLog,
    ) -> list[dict[str, Any]]:
        """The files a job's ``outputPaths`` name, outside ``/outputs`` (those are in the
        manifest already), stored as outputs named by their path; each one with a ``url``
        is uploaded there through the worker's S3 settings."""
        notes: list[str] = []
        found = await asyncio.to_thread(shared.collect, spec.output_paths, notes)
        for note in notes:
            joblog.system(note)
        names = {entry["path"] for entry in manifest}
        total = sum(int(entry.get("size", 0)) for entry in manifest)
        inline_total = sum(
            int(entry.get("size", 0)) for entry in manifest if entry.get("data") is not None
        )
        extra: list[dict[str, Any]] = []
        for f in found:
            name = container_output_name(f.path)
            try:
                name.encode()
                validate_relative_path(name, "outputPaths")
            except (UnicodeEncodeError, InvalidInput) as exc:  # a name the job's code chose
                joblog.system(f"output {one_line(f.path)} skipped ({one_line(str(exc))})")
                continue
            url = output_url(f.output, f.path, f.root)
            if url is not None:
                await upload_to_s3(self.blobs, f.host, url)
            if name in names:
                continue
            total += f.size
            if total > limits.max_bytes:
                joblog.system(f"outputs over {limits.max_bytes} bytes; the rest dropped")
                break
            inline = f.size <= limits.inline_limit and inline_total + f.size <= limits.inline_total
            blob = await store_blob(self.blobs, f.host, inline=inline)
            if inline:
                inline_total += blob.size
            names.add(name)
            extra.append({"path": name, **blob.to_wire()})
        return extra

    async def _store_log(self, content: bytes | Path) -> dict[str, Any]:
        """A whole log as a blob: the bytes kept in memory, or the file it spilled to (a
        JobLog spills only past the inline limit, so a file is always uploaded)."""
        inline = isinstance(content, bytes) and len(content) <= self.config.inline_output_limit
        return (await store_blob(self.blobs, content, inline=inline)).to_wire()


class _StepOutput:
    """A step's output: to the job's log, into its redirect files, and its tails kept."""

    def __init__(self, joblog: JobLog, files: dict[str, Any]) -> None:
        self.joblog = joblog
        self.files = files
        self.tails = {"stdout": bytearray(), "stderr": bytearray()}

    async def __call__(self, stream: str, data: bytes) -> None:
        tail = self.tails.get(stream)
        if tail is not None:
            tail += data
            del tail[: max(0, len(tail) - STEP_TAIL_BYTES)]
        f = self.files.get(stream)
        if f is not None:
            await asyncio.to_thread(f.write, data)
        await self.joblog.on_output(stream, data)


class _Interrupted(Exception):
    """A job's preparation was stopped: by its stop event, or by its deadline."""

    def __init__(self, timed_out: bool) -> None:
        self.timed_out = timed_out
        super().__init__("timed out" if timed_out else "stopped")


async def _until_stopped(running: Running, work: Awaitable[T], deadline: float) -> T:
    """``work``, unless the job is stopped (a cancel, a lost lease, a hand-back) or its
    deadline passes first: then ``work`` is cancelled, and waited for until it is, before
    ``_Interrupted`` is raised."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(running.stop.wait())
    try:
        await asyncio.wait(
            [task, stopper],
            timeout=max(0.0, deadline - time.monotonic()),
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait([task])  # until it is over (a cancel of ours still ends us)
    raise _Interrupted(timed_out=not running.stop.is_set())


def job_fault(exc: BaseException) -> str:
    """The one-line reason a job gets for a fault of the worker's own code on its path."""
    return one_line(f"the worker could not handle this job: {type(exc).__name__}: {exc}")[:4000]


def _log_failed_start(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        logger.info("started not appended (the job was stopping): %s", exc)
