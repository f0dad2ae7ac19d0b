"""Prometheus metrics: a queue's state (for autoscalers) and the gateway's own counters.

A queue's metrics are computed from the log on each scrape (the fold of the queue's jobs and
its live heartbeats), so any gateway answers the same. The gateway's counters live in its own
registry (never the global one), one per application.
"""

from __future__ import annotations

from collections import Counter as TallyCounter
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from asman.log.events import FINISH_REASONS, JobState
from asman.log.workers import WorkerInfo

__all__ = ["CONTENT_TYPE", "GatewayMetrics", "queue_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    """Counters of one gateway process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "asman_gateway_http_requests",
            "HTTP requests answered, by method, route and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "asman_gateway_rate_limited",
            "Requests refused by the per-client rate limit",
            registry=self.registry,
        )
        self.streams = Gauge(
            "asman_gateway_event_streams",
            "Server-Sent Event streams open now",
            registry=self.registry,
        )
        self.followers = Gauge(
            "asman_gateway_followed",
            "Jobs and queues followed now: one shared reader each, whatever their streams",
            registry=self.registry,
        )
        self.submitted = Counter(
            "asman_gateway_jobs_submitted",
            "Jobs submitted through this gateway, by outcome",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueCollector(Collector):
    def __init__(
        self, queue: str, jobs: Sequence[JobState], workers: Sequence[WorkerInfo], now_ms: int
    ) -> None:
        self.queue = queue
        self.jobs = jobs
        self.workers = workers
        self.now_ms = now_ms

    def collect(self) -> Iterable[Metric]:
        q = self.queue
        queued = [j for j in self.jobs if j.state == "queued"]
        running = [j for j in self.jobs if j.state == "running"]
        finished = TallyCounter(j.reason for j in self.jobs if j.finished)

        length = GaugeMetricFamily(
            "queue_length", "Queued and running jobs (compute-queues' autoscaling gauge)"
        )
        length.add_metric([], len(queued) + len(running))
        yield length

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["queue"])
            family.add_metric([q], value)
            return family

        yield gauge("asman_queue_depth", "Jobs waiting for a worker", len(queued))
        yield gauge("asman_queue_running", "Jobs claimed by a worker", len(running))
        oldest = min((j.submitted_ms for j in queued), default=None)
        age = max(0.0, (self.now_ms - oldest) / 1000) if oldest is not None else 0.0
        yield gauge(
            "asman_queue_oldest_waiting_seconds",
            "Age of the oldest job still waiting (0 when none waits)",
            age,
        )
        live = [w for w in self.workers if not w.draining]
        yield gauge("asman_queue_workers", "Workers with a live heartbeat", len(live))
        yield gauge(
            "asman_queue_worker_slots", "Job slots of live workers", sum(w.slots for w in live)
        )
        yield gauge(
            "asman_queue_worker_free_slots",
            "Free job slots of live workers",
            sum(w.free_slots for w in live),
        )
        done = GaugeMetricFamily(
            "asman_queue_finished_jobs",
            "Finished jobs still within retention, by reason",
            labels=["queue", "reason"],
        )
        for reason in FINISH_REASONS:
            done.add_metric([q, reason], finished.get(reason, 0))
        yield done

    def describe(self) -> Iterator[Metric]:
        return iter(())


def queue_metrics(
    queue: str, jobs: Sequence[JobState], workers: Sequence[WorkerInfo], now_ms: int
) -> bytes:
    """The Prometheus text exposition of one queue."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_QueueCollector(queue, jobs, workers, now_ms))
    return generate_latest(registry)
