"""Build contexts from repository URLs (no network: the URL mapping only)."""

from __future__ import annotations

import pytest

from asman.peer.inputs import context_archive_urls


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "https://github.com/metapages/compute-queues",
            [
                "https://github.com/metapages/compute-queues/archive/refs/heads/main.zip",
                "https://github.com/metapages/compute-queues/archive/refs/heads/master.zip",
            ],
        ),
        (
            "https://github.com/o/r/tree/v1.2",
            [
                "https://github.com/o/r/archive/refs/heads/v1.2.zip",
                "https://github.com/o/r/archive/v1.2.zip",
            ],
        ),
        (
            "https://github.com/o/r/commit/0123abc",
            [
                "https://github.com/o/r/archive/refs/heads/0123abc.zip",
                "https://github.com/o/r/archive/0123abc.zip",
            ],
        ),
        (
            "https://user:tok@github.com/o/r.git#dev",
            [
                "https://user:tok@github.com/o/r/archive/refs/heads/dev.zip",
                "https://user:tok@github.com/o/r/archive/dev.zip",
            ],
        ),
        ("https://example.org/ctx.tar.gz", ["https://example.org/ctx.tar.gz"]),
    ],
)
def test_context_urls_map_to_archives(url: str, expected: list[str]) -> None:
    assert context_archive_urls(url) == expected
