"""What every benchmark shares: the machine it ran on, servers on loopback, statistics, tables.

Servers bind 127.0.0.1 and are stopped by PID (``NatsServer.stop``). Every figure is a median
over repetitions, next to a baseline measured in the same run: the box is shared and noisy,
so ratios mean more than absolute figures.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

# Where job folders go for the queue-path benchmarks (the no-op runtime never mounts them).
# This VM's ext4 root is mounted with `discard`: an rmdir there costs ~0.2-0.7 ms, which
# would measure the disk, not the queue. A worker owner picks the data dir; tmpfs is a fair
# choice for jobs that write nothing. The container benchmark keeps the disk.
FAST_TMP = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, Python, nats-server and Docker versions, load at start."""
    from asman.log.server import nats_server_binary

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    nats_version = _run([nats_server_binary(), "--version"])
    docker_version = _run(["docker", "version", "--format", "{{.Server.Version}}"])
    import importlib.metadata as md

    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "nats_server": nats_version.replace("nats-server:", "").strip(),
        "nats_py": md.version("nats-py"),
        "docker": docker_version,
        "kernel": platform.release(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _run(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextmanager
def nats_server(name: str) -> Iterator[Any]:
    """A fresh nats-server (JetStream, file storage on the normal disk) in a temp dir."""
    from asman.log.server import NatsServer

    work = Path(tempfile.mkdtemp(prefix=f"asman-bench-{name}-"))
    server = NatsServer(work / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def scratch(name: str, fast: bool = False) -> Iterator[Path]:
    """A temp dir, removed afterwards; ``fast`` puts it on tmpfs (see FAST_TMP)."""
    work = Path(
        tempfile.mkdtemp(prefix=f"asman-bench-{name}-", dir=str(FAST_TMP) if fast else None)
    )
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    if not xs:
        return float("nan")
    ordered = sorted(xs)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[k])


def rss_kb(pid: int | None = None) -> int:
    """Resident set size of a process (this one by default), from /proc."""
    path = Path(f"/proc/{pid or os.getpid()}/status")
    for line in path.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
