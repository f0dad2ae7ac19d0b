"""GA4GH TES 1.1 on a queue: ``<gateway>/q/<queue>/ga4gh/tes/v1/``.

TES is a translation at the edge: a task is an Asman job. Its executors become the job's
``steps`` (run in order on one worker, sharing volumes, inputs and outputs), its inputs become
``inputs`` (under ``/inputs``) or absolute ``configFiles`` (anywhere else), its outputs become
``outputPaths`` uploaded to their ``s3://`` URL by the worker, its resources become
``requirements``. The same task is the same job: its id, and its cached result. What TES
carries that Asman does not run on (name, description, tags, each input's and output's name)
is kept beside the definition under ``tes``, which is not part of the job id.

Views: MINIMAL (id, state), BASIC (all but executor stdout/stderr, input contents and
system logs), FULL. States: TES's, from the job's (``JobState.tes_state``), with CANCELING
for a cancel the worker has not acted on yet and PREEMPTED while another worker takes over
the task of a worker that was lost.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from asman import __version__
from asman.errors import AsmanError, InvalidInput
from asman.gateway.api import cancel_and_notify, load_job, queue_param, submit_definition
from asman.gateway.limits import read_json
from asman.gateway.schemas import TesExecutor, TesInput, TesOutput, TesResources, TesTask
from asman.gateway.state import BLOBS, CONFIG, LOG
from asman.log import jobs, subjects
from asman.log.events import JobState, OutputFile
from asman.log.steps import OutputPath, container_output_name, has_wildcards, output_url
from asman.peer.outputs import load_outputs

__all__ = ["TES_BASE", "add_routes", "task_definition", "task_state", "task_view"]

TES_BASE = "/q/{queue}/ga4gh/tes/v1"
VIEWS = ("MINIMAL", "BASIC", "FULL")
STATES = (
    "UNKNOWN",
    "QUEUED",
    "INITIALIZING",
    "RUNNING",
    "PAUSED",
    "COMPLETE",
    "EXECUTOR_ERROR",
    "SYSTEM_ERROR",
    "CANCELED",
    "CANCELING",
    "PREEMPTED",
)
DEFAULT_PAGE = 256
MAX_PAGE = 2047
_GIB = 1024**3
# the fields each TES object may carry: those of its model (asman.gateway.schemas), the one
# list the OpenAPI document shows too
TASK_KEYS = frozenset(TesTask.model_fields)
INPUT_KEYS = frozenset(TesInput.model_fields)
OUTPUT_KEYS = frozenset(TesOutput.model_fields)
EXECUTOR_KEYS = frozenset(TesExecutor.model_fields)
RESOURCE_KEYS = frozenset(TesResources.model_fields)


# -- task → definition ---------------------------------------------------------------------------


def _obj(value: Any, where: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"task field {where} must be an object")
    unknown = set(value) - allowed
    if unknown:
        raise InvalidInput(
            f"task field {where} has unknown fields {', '.join(sorted(unknown))[:200]}: "
            f"TES 1.1 allows {', '.join(sorted(allowed))}"
        )
    return {k: v for k, v in value.items() if v is not None}


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidInput(f"task field {where} must be a list")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"task field {where} must be a string")
    return value


def _input_ref(item: Mapping[str, Any], where: str) -> dict[str, Any]:
    kind = item.get("type", "FILE")
    if kind not in ("FILE", "DIRECTORY"):
        raise InvalidInput(f"task field {where}.type must be FILE or DIRECTORY, got {kind!r}")
    if "content" in item:
        if "url" in item:
            raise InvalidInput(f"task field {where}: give either content or url, not both")
        if kind == "DIRECTORY":
            raise InvalidInput(f"task field {where}: a DIRECTORY input cannot have content")
        return {"type": "utf8", "value": _text(item["content"], f"{where}.content")}
    if "url" not in item:
        raise InvalidInput(f"task field {where} needs a url or a content")
    url = _text(item["url"], f"{where}.url")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "s3":
        if kind == "DIRECTORY" and not url.endswith("/"):
            url += "/"
        return {"type": "s3", "value": url}
    if kind == "DIRECTORY":
        raise InvalidInput(
            f"task field {where}: a DIRECTORY input must come from an s3:// prefix "
            f"(an http(s) URL names one file), got {url[:100]!r}"
        )
    if scheme in ("http", "https"):
        return {"type": "url", "value": url}
    if scheme == "blob":
        return {"type": "blob", "value": url[5:]}
    raise InvalidInput(
        f"task field {where}.url {url[:100]!r}: Asman fetches http(s)://, s3:// (with the "
        "worker's S3 settings) and blob:<sha256> URLs, or takes the file's content inline"
    )


def task_definition(task: Any) -> dict[str, Any]:
    """The Asman job definition of a TES task (raises ``InvalidInput`` saying what is wrong;
    the definition is validated again, with the gateway's limits, when it is submitted)."""
    t = dict(_obj(task, "(the task)", TASK_KEYS))
    for ignored in ("id", "state", "logs", "creation_time"):
        t.pop(ignored, None)  # output-only fields: a client may send them back
    executors = _list(t.get("executors"), "executors")
    if not executors:
        raise InvalidInput("task field executors must list at least one executor")
    steps = []
    for i, raw in enumerate(executors):
        where = f"executors[{i}]"
        e = _obj(raw, where, EXECUTOR_KEYS)
        if "image" not in e:
            raise InvalidInput(f"task field {where}.image is missing")
        command = _list(e.get("command"), f"{where}.command")
        if not command:
            raise InvalidInput(f"task field {where}.command must list the program and its args")
        step: dict[str, Any] = {"image": e["image"], "command": command}
        for key in ("workdir", "stdin", "stdout", "stderr", "env"):
            if key in e:
                step[key] = e[key]
        if e.get("ignore_error"):
            step["ignoreError"] = True
        steps.append(step)
    definition: dict[str, Any] = {"steps": steps}
    meta: dict[str, Any] = {}
    for key in ("name", "description"):
        if key in t:
            meta[key] = _text(t[key], key)
    if "tags" in t:
        tags = t["tags"]
        if not isinstance(tags, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
        ):
            raise InvalidInput("task field tags must be an object of strings")
        meta["tags"] = dict(tags)
    inputs: dict[str, Any] = {}
    config: dict[str, Any] = {}
    meta_inputs: list[dict[str, Any]] = []
    for i, raw in enumerate(_list(t.get("inputs"), "inputs")):
        where = f"inputs[{i}]"
        item = _obj(raw, where, INPUT_KEYS)
        path = _text(item.get("path"), f"{where}.path")
        if not path.startswith("/"):
            raise InvalidInput(f"task field {where}.path {path[:100]!r} must be absolute")
        if any(m["path"] == path for m in meta_inputs):
            raise InvalidInput(f"task field {where}.path {path[:100]!r} is given twice")
        ref = _input_ref(item, where)
        if path.startswith("/inputs/"):
            inputs[path[len("/inputs/") :]] = ref
        else:
            config[path] = ref
        meta_inputs.append(
            {k: item[k] for k in ("name", "description", "url", "type") if k in item}
        )
        meta_inputs[-1]["path"] = path
    if inputs:
        definition["inputs"] = inputs
    if config:
        definition["configFiles"] = config
    outputs = []
    for i, raw in enumerate(_list(t.get("outputs"), "outputs")):
        where = f"outputs[{i}]"
        item = _obj(raw, where, OUTPUT_KEYS)
        entry: dict[str, Any] = {"path": _text(item.get("path"), f"{where}.path")}
        kind = item.get("type", "FILE")
        if kind not in ("FILE", "DIRECTORY"):
            raise InvalidInput(f"task field {where}.type must be FILE or DIRECTORY, got {kind!r}")
        if kind == "DIRECTORY":
            entry["type"] = "directory"
        if "path_prefix" in item:
            entry["pathPrefix"] = item["path_prefix"]
        if "url" in item:
            url = _text(item["url"], f"{where}.url")
            if not url.lower().startswith("s3://"):
                raise InvalidInput(
                    f"task field {where}.url {url[:100]!r}: Asman uploads outputs to s3:// URLs "
                    "(with the worker's S3 settings); every output is also kept in the job's "
                    "outputs"
                )
            entry["url"] = url
        outputs.append(entry)
    if outputs:
        definition["outputPaths"] = outputs
    if t.get("volumes"):
        definition["volumes"] = _list(t["volumes"], "volumes")
    requirements, resources = _resources(t.get("resources"))
    if requirements:
        definition["requirements"] = requirements
    if resources:
        meta["resources"] = resources
    if meta_inputs:
        meta["inputs"] = meta_inputs
    names = [
        {k: _text(item[k], k) for k in ("name", "description") if k in item}
        for item in (
            _obj(o, f"outputs[{i}]", OUTPUT_KEYS)
            for i, o in enumerate(_list(t.get("outputs"), "outputs"))
        )
    ]
    if any(names):
        meta["outputs"] = names
    definition["tes"] = meta
    return definition


def _resources(value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(requirements, the resources as given)."""
    if value is None:
        return {}, {}
    r = _obj(value, "resources", RESOURCE_KEYS)
    req: dict[str, Any] = {}
    cpus = r.get("cpu_cores")
    if cpus is not None:
        if isinstance(cpus, bool) or not isinstance(cpus, int) or cpus < 1:
            raise InvalidInput("task field resources.cpu_cores must be a whole number ≥ 1")
        req["cpus"] = cpus
    for key in ("ram_gb", "disk_gb"):
        v = r.get(key)
        if v is not None and (
            isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0
        ):
            raise InvalidInput(f"task field resources.{key} must be a number > 0")
    if r.get("ram_gb") is not None:
        req["memory"] = max(1, math.ceil(float(r["ram_gb"]) * _GIB))
    if r.get("backend_parameters_strict") and r.get("backend_parameters"):
        raise InvalidInput(
            "task field resources.backend_parameters: Asman supports none, and "
            "backend_parameters_strict asks to refuse the task rather than ignore them"
        )
    return req, dict(r)


# -- job → task ----------------------------------------------------------------------------------


def _time(ms: int | None) -> str | None:
    if ms is None:
        return None
    stamp = datetime.fromtimestamp(ms / 1000, UTC)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def task_state(state: JobState) -> str:
    """The task's TES state."""
    if state.state == "running" and state.cancel_requested:
        return "CANCELING"
    if state.state == "running" and state.lease is not None and state.lease.challenge:
        return "PREEMPTED"  # its worker is gone: another one is taking the task over
    return state.tes_state


def _meta(state: JobState) -> Mapping[str, Any]:
    meta = state.definition.get("tes")
    return meta if isinstance(meta, Mapping) else {}


def _executors(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    steps = d.get("steps")
    if not isinstance(steps, list):  # a job made with Asman's own API: one executor
        command = d.get("command")
        image = d.get("image") or "(built from the job's build spec)"
        steps = [{"image": image, "command": command}]
    out = []
    for s in steps:
        if not isinstance(s, Mapping):
            continue
        command = s.get("command")
        if isinstance(command, str):
            command = ["sh", "-c", command]
        e: dict[str, Any] = {
            "image": s.get("image") or d.get("image") or "",
            "command": command or [],
        }
        for key in ("workdir", "stdin", "stdout", "stderr", "env"):
            if s.get(key) is not None:
                e[key] = s[key]
        if s.get("ignoreError"):
            e["ignore_error"] = True
        out.append(e)
    return out


def _inputs(d: Mapping[str, Any], meta: Mapping[str, Any], full: bool) -> list[dict[str, Any]]:
    by_path = {m.get("path"): m for m in meta.get("inputs", ()) if isinstance(m, Mapping)}
    out = []
    for key, prefix in (("inputs", "/inputs/"), ("configFiles", "")):
        refs = d.get(key)
        if not isinstance(refs, Mapping):
            continue
        for name, ref in refs.items():
            path = name if name.startswith("/") else prefix + name
            if not path.startswith("/"):
                path = "/inputs/" + name
            item: dict[str, Any] = {"path": path, "type": "FILE"}
            m = by_path.get(path, {})
            item.update({k: m[k] for k in ("name", "description", "url", "type") if k in m})
            if isinstance(ref, Mapping):
                kind, value = ref.get("type", "utf8"), ref.get("value")
            else:
                kind, value = "utf8", ref
            if kind == "utf8" and "url" not in item:
                if full:
                    item["content"] = value if isinstance(value, str) else json.dumps(value)
            elif kind == "base64" and "url" not in item:
                if full:
                    try:
                        item["content"] = base64.b64decode(str(value)).decode(errors="replace")
                    except (binascii.Error, ValueError):
                        item["content"] = ""
            elif kind == "blob":
                item.setdefault("url", f"blob:{value}")
            elif isinstance(value, str):
                item.setdefault("url", value)
            out.append(item)
    return out


def _outputs(d: Mapping[str, Any], meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    raw_names = meta.get("outputs")
    names: list[Any] = raw_names if isinstance(raw_names, list) else []
    out = []
    for i, raw in enumerate(d.get("outputPaths") or ()):
        if not isinstance(raw, Mapping):
            continue
        item: dict[str, Any] = {
            "path": raw.get("path"),
            "url": raw.get("url", ""),
            "type": "DIRECTORY" if raw.get("type") == "directory" else "FILE",
        }
        if raw.get("pathPrefix") is not None:
            item["path_prefix"] = raw["pathPrefix"]
        if i < len(names) and isinstance(names[i], Mapping):
            item.update({k: v for k, v in names[i].items() if k in ("name", "description")})
        out.append(item)
    return out


def _output_logs(d: Mapping[str, Any], files: tuple[OutputFile, ...]) -> list[dict[str, Any]]:
    """The output files a task's outputs matched: their url, container path and size."""
    by_name = {f.path: f for f in files}
    out = []
    for raw in d.get("outputPaths") or ():
        if not isinstance(raw, Mapping):
            continue
        try:
            o = OutputPath.from_json(raw)
        except KeyError:
            continue
        name = container_output_name(o.path)
        for f in files:
            path = "/" + f.path if not o.path.startswith("/outputs/") else "/outputs/" + f.path
            if has_wildcards(o.path):
                if not fnmatch.fnmatchcase(path, o.path):
                    continue
                root = path
            elif f.path == name:
                root = path
            elif f.path.startswith(name + "/") and o.type == "directory":
                root = o.path
            else:
                continue
            out.append(
                {
                    "url": output_url(o, path, root) or "",
                    "path": path,
                    "size_bytes": str(by_name[f.path].blob.size),
                }
            )
    return out


def _system_logs(state: JobState) -> list[str]:
    r = state.result
    if r is None:
        return []
    lines = [f"asman: job {state.job_id} finished {r.reason} on attempt {r.attempt}"]
    if r.message:
        lines.append(r.message)
    for i, s in enumerate(r.steps):
        if s.exit_code not in (0, None):
            lines.append(f"executor {i} ({s.name}) exited with {s.exit_code}")
    if r.oom_killed:
        lines.append("the container ran out of memory and was killed")
    return lines


async def task_view(request: web.Request, state: JobState, view: str = "BASIC") -> dict[str, Any]:
    """A job as a TES task in ``view``."""
    task: dict[str, Any] = {"id": state.job_id, "state": task_state(state)}
    if view == "MINIMAL":
        return task
    d, meta, full = state.definition, _meta(state), view == "FULL"
    for key in ("name", "description"):
        if isinstance(meta.get(key), str):
            task[key] = meta[key]
    task["inputs"] = _inputs(d, meta, full)
    task["outputs"] = _outputs(d, meta)
    resources = dict(meta["resources"]) if isinstance(meta.get("resources"), Mapping) else {}
    raw_req = d.get("requirements")
    req: Mapping[str, Any] = raw_req if isinstance(raw_req, Mapping) else {}
    if "cpus" in req and "cpu_cores" not in resources:
        resources["cpu_cores"] = math.ceil(float(req["cpus"]))
    if resources:
        task["resources"] = resources
    task["executors"] = _executors(d)
    if d.get("volumes"):
        task["volumes"] = list(d["volumes"])
    task["tags"] = dict(meta["tags"]) if isinstance(meta.get("tags"), Mapping) else {}
    task["creation_time"] = _time(state.submitted_ms)
    task["logs"] = await _task_logs(request, state, full)
    return task


async def _task_logs(request: web.Request, state: JobState, full: bool) -> list[dict[str, Any]]:
    r = state.result
    if r is None and state.started_ms is None:
        return []
    log: dict[str, Any] = {}
    start = state.started_ms or (r.steps[0].started_ms if r and r.steps else None)
    if start is not None:
        log["start_time"] = _time(start)
    if r is None:
        log["logs"] = []
        return [log]
    log["end_time"] = _time(r.finished_ms)
    log["metadata"] = {
        "worker": r.worker,
        "attempt": str(r.attempt),
        "reason": r.reason,
        "queue": state.queue,
    }
    steps = r.steps
    if not steps and r.exit_code is not None:  # a single-container job: one executor
        ex: dict[str, Any] = {"exit_code": r.exit_code}
        if start is not None:
            ex["start_time"] = _time(start)
        ex["end_time"] = _time(r.finished_ms)
        log["logs"] = [ex]
    else:
        log["logs"] = []
        for s in steps:
            ex = {"exit_code": s.exit_code if s.exit_code is not None else -1}
            if s.started_ms is not None:
                ex["start_time"] = _time(s.started_ms)
            if s.ended_ms is not None:
                ex["end_time"] = _time(s.ended_ms)
            if full:
                ex["stdout"], ex["stderr"] = s.stdout, s.stderr
            log["logs"].append(ex)
    try:
        files = await load_outputs(request.app[BLOBS], r)
    except AsmanError:
        files = r.outputs
    log["outputs"] = _output_logs(state.definition, files)
    if full:
        log["system_logs"] = _system_logs(state)
    return [log]


# -- handlers ------------------------------------------------------------------------------------


def _view(request: web.Request, default: str) -> str:
    view = request.query.get("view") or default
    if view not in VIEWS:
        raise InvalidInput(f"view must be MINIMAL, BASIC or FULL, got {view[:20]!r}")
    return view


def _task_id(request: web.Request) -> str:
    return subjects.validate_job_id(request.match_info["id"])


async def service_info(request: web.Request) -> web.Response:
    queue = queue_param(request)
    config = request.app[CONFIG]
    return web.json_response(
        {
            "id": f"org.asman.tes.{config.name}",
            "name": f"Asman queue {queue} (GA4GH TES 1.1)",
            "type": {"group": "org.ga4gh", "artifact": "tes", "version": "1.1.0"},
            "description": (
                "Tasks run as Asman jobs on this queue: each executor a hardened container, "
                "in order, on one worker"
            ),
            "organization": {"name": "Asman", "url": "https://github.com/asman"},
            "version": __version__,
            "storage": ["s3://", "http://", "https://", "blob:"],
            "tes_resources_backend_parameters": [],
        }
    )


async def create_task(request: web.Request) -> web.Response:
    queue = queue_param(request)
    body = await read_json(request, request.app[CONFIG].limits.max_body_bytes)
    definition = task_definition(body)
    submitted = await submit_definition(request, queue, definition)
    return web.json_response({"id": submitted.job_id})


async def get_task(request: web.Request) -> web.Response:
    queue, task = queue_param(request), _task_id(request)
    view = _view(request, "MINIMAL")
    state = await load_job(request, queue, task)
    return web.json_response(await task_view(request, state, view))


def _page_token(state: JobState) -> str:
    raw = f"{state.submitted_ms}:{state.job_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        ms, job = raw.split(":", 1)
        return int(ms), subjects.validate_job_id(job)
    except (ValueError, AsmanError, binascii.Error, UnicodeDecodeError):
        raise InvalidInput(
            "page_token is not one this gateway gave: pass next_page_token as it was"
        ) from None


def _tag_filters(request: web.Request) -> list[tuple[str, str]]:
    keys = request.query.getall("tag_key", [])
    values = request.query.getall("tag_value", [])
    if len(values) > len(keys):
        raise InvalidInput("tag_value needs a tag_key before it (one tag_key per tag_value)")
    return [(k, values[i] if i < len(values) else "") for i, k in enumerate(keys)]


async def list_tasks(request: web.Request) -> web.Response:
    queue = queue_param(request)
    view = _view(request, "MINIMAL")
    raw_size = request.query.get("page_size") or str(DEFAULT_PAGE)
    if not raw_size.isdigit() or not 1 <= int(raw_size) <= MAX_PAGE:
        raise InvalidInput(f"page_size must be a whole number from 1 to {MAX_PAGE}")
    size = int(raw_size)
    wanted = request.query.get("state")
    if wanted is not None and wanted not in STATES:
        raise InvalidInput(f"state must be one of {', '.join(STATES)}, got {wanted[:20]!r}")
    prefix = request.query.get("name_prefix")
    tags = _tag_filters(request)
    token = request.query.get("page_token")
    after = _after(token) if token else None
    states = await jobs.list_jobs(request.app[LOG], queue)
    states.sort(key=lambda s: (-s.submitted_ms, s.job_id))  # the newest first, TES's order
    picked: list[JobState] = []
    more = False
    for s in states:
        if after is not None and (-s.submitted_ms, s.job_id) <= (-after[0], after[1]):
            continue
        meta = _meta(s)
        if wanted and task_state(s) != wanted:
            continue
        name = meta.get("name")
        if prefix and not (isinstance(name, str) and name.startswith(prefix)):
            continue
        raw_tags = meta.get("tags")
        have: Mapping[str, Any] = raw_tags if isinstance(raw_tags, Mapping) else {}
        if any(k not in have or (v and have[k] != v) for k, v in tags):
            continue
        if len(picked) == size:
            more = True
            break
        picked.append(s)
    out: dict[str, Any] = {"tasks": [await task_view(request, s, view) for s in picked]}
    if more:
        out["next_page_token"] = _page_token(picked[-1])
    return web.json_response(out)


async def cancel_task(request: web.Request) -> web.Response:
    queue, task = queue_param(request), _task_id(request)
    # a task that never ran ends with the gateway's cancel: its finished callback is ours
    await cancel_and_notify(request, queue, task, "cancelled through TES")
    return web.json_response({})


def add_routes(app: web.Application) -> None:
    r = app.router
    task = f"{TES_BASE}/tasks/{{id:[^/:]+}}"
    r.add_get(f"{TES_BASE}/service-info", service_info)
    r.add_post(f"{TES_BASE}/tasks", create_task)
    r.add_get(f"{TES_BASE}/tasks", list_tasks)
    r.add_get(task, get_task)
    r.add_post(f"{task}:cancel", cancel_task)
