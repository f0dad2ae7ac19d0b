"""Asman: public compute queues on a shared log.

The public API is what ``__all__`` lists::

    import asman
    asman.job_id({"image": "alpine:3.19.1", "command": 'echo "hello world"'})

    async with asman.Client.connect(settings) as client:
        sub = await client.submit("my-queue", {"image": "alpine", "command": "echo hi"})
        state = await client.wait("my-queue", sub.job_id)
"""

from asman.config import BlobSettings, ClientSettings
from asman.errors import AsmanError
from asman.log.connection import Log, LogConfig
from asman.log.definition import JobSpec, job_id, validate_definition
from asman.log.events import JobState, Result
from asman.log.keys import PeerKey
from asman.peer.client import Client, FileInput, collect_files

__version__ = "0.2.0"

__all__ = [
    "AsmanError",
    "BlobSettings",
    "Client",
    "ClientSettings",
    "FileInput",
    "JobSpec",
    "JobState",
    "Log",
    "LogConfig",
    "PeerKey",
    "Result",
    "__version__",
    "collect_files",
    "job_id",
    "validate_definition",
]
