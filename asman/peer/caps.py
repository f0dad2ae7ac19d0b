"""What one job may use on a worker: the operator's ceilings, and their defaults.

Every job runs capped, whether or not its definition asks for anything and whether or not the
operator set anything: a job may ask for less than a ceiling, or up to it, never more
(docs/guide.md, "Running a worker safely", has the table).

========================  ==========================================  =====================
cap                       default                                     flag
========================  ==========================================  =====================
memory                    the host's memory ÷ slots (≥ 256 MiB)        ``--memory``
CPUs                      the host's CPUs                             ``--cpus-per-job``
processes (pids)          1,024                                       ``--pids``
``/dev/shm``              64 MiB, and never more than the memory cap  ``--shm``
``/tmp`` (a tmpfs)        256 MiB, counted in the memory cap          ``--tmp-size``
output bytes              10 GiB                                      ``--max-output-bytes``
output files              10,000                                      ``--max-outputs``
log bytes (kept)          64 MiB                                      ``--max-log-bytes``
========================  ==========================================  =====================

Builds run under the same memory and CPU caps, and inside the job's time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from asman.errors import InvalidInput
from asman.log.definition import JobSpec

__all__ = [
    "DEFAULT_LOG_BYTES",
    "DEFAULT_OUTPUT_BYTES",
    "DEFAULT_OUTPUT_FILES",
    "DEFAULT_PIDS",
    "DEFAULT_SHM",
    "DEFAULT_TMP",
    "Caps",
    "JobLimits",
    "host_memory_bytes",
]

_MIB = 1024 * 1024
MIN_MEMORY = 256 * _MIB
DEFAULT_SHM = 64 * _MIB
DEFAULT_TMP = 256 * _MIB
DEFAULT_PIDS = 1024
DEFAULT_OUTPUT_BYTES = 10 * 1024**3
DEFAULT_OUTPUT_FILES = 10_000
DEFAULT_LOG_BYTES = 64 * _MIB


def host_memory_bytes() -> int:
    """The host's memory (Linux: the physical pages; elsewhere 8 GiB, a guess said so)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


@dataclass(frozen=True, slots=True)
class JobLimits:
    """The limits one job's container gets."""

    memory_bytes: int
    cpus: float
    pids: int
    shm_bytes: int
    tmp_bytes: int


@dataclass(frozen=True, slots=True)
class Caps:
    """A worker's ceilings for every job."""

    memory_bytes: int
    cpus: float
    pids: int = DEFAULT_PIDS
    shm_bytes: int = DEFAULT_SHM
    tmp_bytes: int = DEFAULT_TMP
    output_bytes: int = DEFAULT_OUTPUT_BYTES
    output_files: int = DEFAULT_OUTPUT_FILES
    log_bytes: int = DEFAULT_LOG_BYTES

    def __post_init__(self) -> None:
        if self.memory_bytes < 16 * _MIB:
            raise InvalidInput(f"--memory must be at least 16m, got {self.memory_bytes} bytes")
        if not 0 < self.cpus <= 4096:
            raise InvalidInput(f"--cpus-per-job must be more than 0, got {self.cpus}")
        if not 16 <= self.pids <= 1_000_000:
            raise InvalidInput(f"--pids must be 16 to 1000000, got {self.pids}")
        for name, value in (
            ("--shm", self.shm_bytes),
            ("--tmp-size", self.tmp_bytes),
            ("--max-output-bytes", self.output_bytes),
            ("--max-log-bytes", self.log_bytes),
        ):
            if value < _MIB:
                raise InvalidInput(f"{name} must be at least 1m, got {value} bytes")
        if self.output_files < 1:
            raise InvalidInput(f"--max-outputs must be at least 1, got {self.output_files}")

    @classmethod
    def defaults(
        cls,
        slots: int,
        *,
        memory_bytes: int | None = None,
        cpus: float | None = None,
        **overrides: int,
    ) -> Caps:
        """The ceilings of a worker with ``slots`` slots: what the operator set, and the
        defaults of the table for the rest."""
        if memory_bytes is None:
            memory_bytes = max(MIN_MEMORY, host_memory_bytes() // max(1, slots))
        if cpus is None:
            cpus = float(os.cpu_count() or 1)
        return cls(memory_bytes=memory_bytes, cpus=cpus, **overrides)

    def for_job(self, spec: JobSpec) -> JobLimits:
        """The container's limits: what the job asks for, up to the ceilings."""
        memory = min(spec.memory or self.memory_bytes, self.memory_bytes)
        cpus = min(spec.cpus or self.cpus, self.cpus)
        shm = min(spec.shm_size or DEFAULT_SHM, self.shm_bytes, memory)
        return JobLimits(
            memory_bytes=memory,
            cpus=cpus,
            pids=self.pids,
            shm_bytes=shm,
            tmp_bytes=min(self.tmp_bytes, memory),
        )
