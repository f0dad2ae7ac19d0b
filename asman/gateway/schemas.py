"""The gateway's generated schemas: the job definition's (``asman.log.schema``) and GA4GH TES
1.1's task types, as pydantic models, written out as JSON Schema for the OpenAPI document
(``components.schemas``) and for the page's editor (``GET /api/v1/schema/definition.json``).

The TES models are the one list of the fields a task may carry: ``asman.gateway.tes`` takes
its allowed keys from them, and the OpenAPI document shows them.
"""

from __future__ import annotations

from functools import cache
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from asman.log.schema import Definition, definition_json_schema

__all__ = [
    "SCHEMA_ROUTE",
    "TesExecutor",
    "TesInput",
    "TesListTasksResponse",
    "TesOutput",
    "TesResources",
    "TesTask",
    "component_schemas",
    "definition_json_schema",
    "definition_schema",
]

#: where the page's editor reads the definition's JSON Schema
SCHEMA_ROUTE = "/api/v1/schema/definition.json"

_Kind = Literal["FILE", "DIRECTORY"]


class _Tes(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TesExecutor(_Tes):
    """One container of a task; a task's executors run in order (Asman: the job's steps)."""

    image: str = Field(description="The image to run")
    command: list[str] = Field(min_length=1, description="Program and arguments (no shell)")
    workdir: str | None = Field(default=None, description="Absolute working folder")
    stdin: str | None = Field(default=None, description="Absolute path read as stdin")
    stdout: str | None = Field(default=None, description="Absolute path stdout goes to")
    stderr: str | None = Field(default=None, description="Absolute path stderr goes to")
    env: dict[str, str] | None = Field(default=None, description="Environment")
    ignore_error: bool | None = Field(
        default=None, description="Run the next executor even when this one exits non-zero"
    )


class TesInput(_Tes):
    """A file or folder placed at ``path`` before the first executor."""

    name: str | None = None
    description: str | None = None
    url: str | None = Field(
        default=None, description="http(s)://, s3:// (the worker's S3) or blob:<sha256>"
    )
    path: str = Field(description="Absolute path in the containers")
    type: _Kind | None = Field(default=None, description="FILE (the default) or DIRECTORY")
    content: str | None = Field(default=None, description="The file's text, instead of a url")
    streamable: bool | None = Field(default=None, description="Accepted and ignored")


class TesOutput(_Tes):
    """A file or folder uploaded to ``url`` after the last executor."""

    name: str | None = None
    description: str | None = None
    url: str = Field(description="s3://bucket/key the worker uploads it to")
    path: str = Field(description="Absolute path; may hold wildcards with path_prefix")
    path_prefix: str | None = Field(default=None, description="Cut from each wildcard match")
    type: _Kind | None = Field(default=None, description="FILE (the default) or DIRECTORY")


class TesResources(_Tes):
    """What a task needs (Asman: the job's requirements)."""

    cpu_cores: int | None = Field(default=None, ge=1, description="CPUs (requirements.cpus)")
    preemptible: bool | None = Field(default=None, description="Accepted and ignored")
    ram_gb: float | None = Field(default=None, gt=0, description="Memory (requirements.memory)")
    disk_gb: float | None = Field(default=None, gt=0, description="Accepted and ignored")
    zones: list[str] | None = None
    backend_parameters: dict[str, str] | None = None
    backend_parameters_strict: bool | None = None


class TesTask(_Tes):
    """A task: the job of its executors. ``id``, ``state``, ``logs`` and ``creation_time`` are
    the server's; a client may send them back, and they are ignored."""

    id: str | None = None
    state: str | None = None
    name: str | None = None
    description: str | None = None
    inputs: list[TesInput] | None = None
    outputs: list[TesOutput] | None = None
    resources: TesResources | None = None
    executors: list[TesExecutor] = Field(min_length=1)
    volumes: list[str] | None = None
    tags: dict[str, str] | None = None
    logs: list[dict[str, Any]] | None = None
    creation_time: str | None = None


class TesListTasksResponse(_Tes):
    """A page of tasks, newest first."""

    tasks: list[TesTask]
    next_page_token: str | None = None


@cache
def component_schemas() -> dict[str, Any]:
    """``components.schemas`` for the definition and the TES types (validation mode: what a
    client sends), each referring to the others by ``#/components/schemas/<name>``."""
    _, out = models_json_schema(
        [(m, "validation") for m in (Definition, TesTask, TesListTasksResponse)],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = out["$defs"]
    return schemas


async def definition_schema(request: web.Request) -> web.Response:
    """``GET /api/v1/schema/definition.json``: the definition's JSON Schema (2020-12)."""
    return web.json_response(
        definition_json_schema(), headers={"Cache-Control": "public, max-age=300"}
    )
