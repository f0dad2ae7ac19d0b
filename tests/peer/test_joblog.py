"""A job's log while it runs: kept in memory while small, in a file past that, bounded."""

from __future__ import annotations

from pathlib import Path

from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.peer.joblog import JobLog


async def test_small_log_stays_in_memory_and_makes_no_file(nats_url: str, tmp_path: Path) -> None:
    async with Log(LogConfig(servers=(nats_url,)), PeerKey.generate()) as log:
        file = tmp_path / "job" / "run.log"
        async with JobLog(log, "q", "a" * 64, 1, file, spill_bytes=100) as joblog:
            joblog.write("stdout", b"hello\n")
            joblog.write("build", b"step 1\n")
            joblog.write("stderr", b"oops\n")
        assert joblog.content("run") == b"hello\noops\n"
        assert joblog.content("build") == b"step 1\n"
        assert (joblog.run_size, joblog.build_size) == (11, 7)
        assert not joblog.spilled
        assert not file.parent.exists()  # not even the job's folder


async def test_a_log_past_the_spill_size_goes_to_a_file_whole_and_bounded(
    nats_url: str, tmp_path: Path
) -> None:
    async with Log(LogConfig(servers=(nats_url,)), PeerKey.generate()) as log:
        file = tmp_path / "job" / "run.log"
        chunks = [bytes([65 + i]) * 40 for i in range(5)]  # 200 bytes in all
        async with JobLog(log, "q", "b" * 64, 1, file, spill_bytes=100, total_limit=150) as joblog:
            for chunk in chunks:
                joblog.write("stdout", chunk)
        assert joblog.spilled
        assert joblog.content("run") == file
        assert joblog.content("build") == b""  # the build log stayed small: in memory
        data = file.read_bytes()
        assert data.startswith(b"".join(chunks)[:150])  # in order, cut at the limit
        assert b"log over 150 bytes, the rest was dropped" in data
        assert joblog.run_size == 150
