"""A NATS password in a URL never reaches a message (the compose and Kubernetes recipes put
the operator's password in ``ASMAN_NATS_URL``)."""

from __future__ import annotations

import pytest

from asman.errors import LogUnavailable
from asman.log.connection import Log, LogConfig
from asman.log.keys import PeerKey
from asman.log.server import free_port


async def test_a_failed_connect_names_the_server_but_not_its_password() -> None:
    port = free_port()  # nothing listens there
    log = Log(
        LogConfig(servers=(f"nats://asman:s3cret-pw@127.0.0.1:{port}",), connect_timeout_s=1),
        PeerKey.generate(),
    )
    with pytest.raises(LogUnavailable) as caught:
        await log.connect()
    assert f"nats://asman:***@127.0.0.1:{port}" in str(caught.value)
    assert "s3cret-pw" not in str(caught.value)
