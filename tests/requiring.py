"""The one rule for tests whose server is missing: skip on a dev box, fail when ``CI`` is set."""

from __future__ import annotations

import os

import pytest


def require(condition: bool, what: str) -> None:
    """Skip a test whose server (Docker, NATS, S3, Chromium) is missing; fail it in CI."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is missing", pytrace=False)
    pytest.skip(f"{what} is missing")
